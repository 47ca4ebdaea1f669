#!/usr/bin/env bash
# Builds the Debian package: target/debian/tftpcast_<version>-1_<arch>.deb with the binary,
# the systemd units, the default configuration as /etc/tftpcast/tftpcast.toml (a conffile),
# man pages, bash/zsh/fish completions and the Grafana dashboard. Needs cargo-deb
# (`cargo install cargo-deb --locked`). Install with: apt install ./target/debian/tftpcast_*.deb
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin tftpcast
extra=target/deb-extra
rm -rf "$extra" && mkdir -p "$extra/man" "$extra/completions"
target/release/tftpcast man "$extra/man"
gzip -9n "$extra"/man/*.1
target/release/tftpcast completions bash > "$extra/completions/tftpcast"
target/release/tftpcast completions zsh > "$extra/completions/_tftpcast"
target/release/tftpcast completions fish > "$extra/completions/tftpcast.fish"
cargo deb --no-build --locked "$@"
