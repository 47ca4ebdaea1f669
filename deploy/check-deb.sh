#!/usr/bin/env bash
# Checks an installed tftpcast Debian package as a new user would meet it (CI runs this after
# `apt install ./target/debian/tftpcast_*.deb`, as root): every file in place, the shipped
# configuration valid, the units verified (when systemd-analyze exists), and the installed
# binary serving /srv/tftp to tftp-hpa on loopback with the shipped configuration.
set -euo pipefail
fail() { echo "check-deb: $*" >&2; exit 1; }

for f in /usr/bin/tftpcast /lib/systemd/system/tftpcast.service /lib/systemd/system/tftpcast.socket \
         /etc/tftpcast/tftpcast.toml /usr/share/man/man1/tftpcast.1.gz /usr/share/man/man1/tftpcast-serve.1.gz \
         /usr/share/bash-completion/completions/tftpcast /usr/share/doc/tftpcast/grafana-dashboard.json; do
    [ -e "$f" ] || fail "$f is missing"
done
dpkg-query -W -f='${Conffiles}\n' tftpcast | grep -q /etc/tftpcast/tftpcast.toml || fail "the configuration is not a conffile"
[ -d /srv/tftp ] || fail "postinst did not create /srv/tftp"
tftpcast --version
tftpcast check-config --config /etc/tftpcast/tftpcast.toml >/dev/null || fail "the shipped configuration does not validate"
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify /lib/systemd/system/tftpcast.socket /lib/systemd/system/tftpcast.service
fi

# Serve with the shipped configuration (its root /srv/tftp), on a loopback port.
probe="check-deb-$$.bin"
head -c 300000 /dev/urandom > "/srv/tftp/$probe"
out=$(mktemp)
tftpcast serve --config /etc/tftpcast/tftpcast.toml --listen 127.0.0.1:16969 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "/srv/tftp/$probe" "$out"' EXIT
for _ in $(seq 50); do
    tftp 127.0.0.1 16969 -m octet -c get "$probe" "$out" 2>/dev/null && break
    sleep 0.1
done
cmp "/srv/tftp/$probe" "$out" || fail "the installed server did not serve $probe byte-exact"
echo "check-deb: package installed and serving"
