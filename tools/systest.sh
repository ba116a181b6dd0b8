#!/usr/bin/env bash
# Run a command (the test suite: `make test`, `.ci/run`) with the system tools of
# tools/system-tools.txt present.
#
# As root with apt-get: installs the missing ones first (services kept from starting with a
# policy-rc.d that exits 101) and afterwards purges exactly the packages the install added, so the
# machine is left as found. Otherwise (not root, no apt, or REBIND_SYSTEST_INSTALL=0) nothing is
# installed: the tests that need a missing tool skip, with one summary line saying what did not
# run -- and under CI=true they fail instead (tests/toolcheck.py).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
while read -r tool pkg _; do
    [[ -z "$tool" || "$tool" == \#* ]] && continue
    command -v "$tool" >/dev/null 2>&1 || missing+=("$pkg")
done < tools/system-tools.txt
if ((${#missing[@]})); then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
fi

installed() { dpkg-query -W -f='${db:Status-Abbrev} ${binary:Package}\n' | awk '$1 == "ii" { print $2 }' | sort; }

can_install() {
    [ "${REBIND_SYSTEST_INSTALL:-1}" != 0 ] && [ "$(id -u)" = 0 ] \
        && command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1
}

added=()
added_policy=
policy=${REBIND_POLICY_RC:-/usr/sbin/policy-rc.d}  # overridable for tests/cli/test_toolcheck.py
cleanup() {
    status=$?
    if ((${#added[@]})); then
        echo "systest: removing what it installed: ${added[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get purge -y -q "${added[@]}" >/dev/null 2>&1 || true
    fi
    if [ -n "$added_policy" ]; then rm -f "$policy"; fi
    exit "$status"
}

if ((${#missing[@]})) && can_install; then
    trap cleanup EXIT
    before=$(installed)
    # Debian's prometheus, docker.io and nginx would start their services; policy-rc.d (exit 101)
    # keeps invoke-rc.d from starting anything during the install.
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"
        chmod 755 "$policy"
        added_policy=1
    fi
    echo "systest: installing ${missing[*]} (removed again afterwards)"
    apt-get update -q >/dev/null
    # podman: with its recommends (netavark, iptables); see tests/engines/conftest.py.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null || true
    mapfile -t added < <(comm -13 <(printf '%s\n' "$before") <(installed))
    if command -v systemctl >/dev/null 2>&1; then
        systemctl stop prometheus docker containerd nginx >/dev/null 2>&1 || true
    fi
elif ((${#missing[@]})); then
    echo "systest: not installing ${missing[*]} (needs root and apt-get); their tests will not run"
fi

"$@"
