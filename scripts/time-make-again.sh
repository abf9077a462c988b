#!/bin/sh
# Once everything is installed, `make test` and `make lab` must be quick when
# nothing changed: their set-up steps (make setup, and the test extras) run
# again and must do nothing, in seconds. Run in the repository, as root.
set -eu
cd "$(dirname "$0")/.."
start=$(date +%s)
make -q setup .make/hub-proxy .make/collaboration >/dev/null 2>&1 || {
    echo "time-make-again: make setup would do something again:"
    make -n setup .make/hub-proxy .make/collaboration | head -n 20
    exit 1
}
make setup .make/hub-proxy .make/collaboration >/dev/null
echo "time-make-again: set-up again, nothing to do: $(( $(date +%s) - start )) s"
