# Shared by the scripts that drive the release window under Xvfb (packaging/e2e-window.sh,
# packaging/soak.sh, benches/labels-training.sh); sourced inside their xvfb-run shell.

# Waits up to TRIES half-seconds (default 120) for the histolens window, then puts it at 0,0 in
# 1280x800 with the focus. Sets `wid`; prints LOG and fails when no window appears.
wait_for_window() {
  local log=$1 tries=${2:-120}
  wid=""
  for _ in $(seq "$tries"); do
    wid=$(xdotool search --name "^histolens" 2>/dev/null | head -n1 || true)
    [ -n "$wid" ] && break
    sleep 0.5
  done
  [ -n "$wid" ] || { echo "no window appeared"; cat "$log"; return 1; }
  xdotool windowsize "$wid" 1280 800 windowmove "$wid" 0 0 windowfocus "$wid" 2>/dev/null || true
}
