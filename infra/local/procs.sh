# Process and port checks shared by up.sh and down.sh (sourced; needs only bash, /proc and awk).

# alive PID: the process exists and is not a zombie (pid 1 here may reap late; kill -0 succeeds on zombies)
alive() {
  local stat
  stat=$(cat "/proc/${1:-x}/stat" 2>/dev/null) || return 1
  stat=${stat##*) } # after the command name, which may contain spaces and parentheses
  [ "${stat%% *}" != Z ]
}

# listening PORT: some TCP socket listens on PORT, on any address (from /proc/net/tcp*; no ss/netstat needed)
listening() {
  local hex
  hex=$(printf '%04X' "$1")
  awk -v h="$hex" '$4 == "0A" && $2 ~ (":" h "$") { found = 1 } END { exit !found }' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}
