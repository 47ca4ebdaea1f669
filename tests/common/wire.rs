//! Bytes on the wire: nftables counters on a namespace's output, split into UDP to multicast
//! groups and UDP to single addresses.

use std::ffi::OsStr;
use std::process::Command;

use super::{run_ok, tool};

/// IPv4 + UDP header bytes of one packet (no IP options).
pub const IP_UDP: u64 = 28;
/// The TFTP DATA header.
pub const DATA_HDR: u64 = 4;

const WIRE_TABLE: &str = "tcwire";

/// `program args...` inside network namespace `ns`.
pub fn ns_command(ns: &str, program: impl AsRef<OsStr>, args: &[&str]) -> Command {
    let mut c = Command::new(tool("ip"));
    c.args(["netns", "exec", ns]).arg(program).args(args);
    c
}

/// What a namespace sent, IP headers included.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wire {
    /// UDP packets/bytes sent to 224.0.0.0/4.
    pub mc_packets: u64,
    pub mc_bytes: u64,
    /// UDP packets/bytes sent to anything else (clients, peers).
    pub uc_packets: u64,
    pub uc_bytes: u64,
}

impl Wire {
    /// Adds the counting table to namespace `ns` (output hook: what it sends).
    pub fn install(ns: &str) {
        let nft = tool("nft");
        let cmds: &[&[&str]] = &[
            &["add", "table", "ip", WIRE_TABLE],
            &["add", "counter", "ip", WIRE_TABLE, "mc_out"],
            &["add", "counter", "ip", WIRE_TABLE, "uc_out"],
            &["add", "chain", "ip", WIRE_TABLE, "out", "{ type filter hook output priority 0 ; }"],
            &["add", "rule", "ip", WIRE_TABLE, "out", "ip", "daddr", "224.0.0.0/4", "meta", "l4proto", "udp", "counter", "name", "mc_out"],
            &["add", "rule", "ip", WIRE_TABLE, "out", "ip", "daddr", "!=", "224.0.0.0/4", "meta", "l4proto", "udp", "counter", "name", "uc_out"],
        ];
        for c in cmds {
            run_ok(&mut ns_command(ns, &nft, c));
        }
    }

    /// Both counters of namespace `ns`, from one listing.
    pub fn read(ns: &str) -> Wire {
        let r = run_ok(&mut ns_command(ns, tool("nft"), &["list", "table", "ip", WIRE_TABLE]));
        let counter = |name: &str| -> (u64, u64) {
            let at = r
                .stdout
                .find(&format!("counter {name} {{"))
                .unwrap_or_else(|| panic!("no counter {name} in nft output:\n{r}"));
            let w: Vec<&str> = r.stdout[at..].split_whitespace().take(8).collect();
            let get = |k: &str| {
                w.windows(2)
                    .find(|p| p[0] == k)
                    .and_then(|p| p[1].parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("no `{k}` for counter {name} in nft output:\n{r}"))
            };
            (get("packets"), get("bytes"))
        };
        let (mc_packets, mc_bytes) = counter("mc_out");
        let (uc_packets, uc_bytes) = counter("uc_out");
        Wire {
            mc_packets,
            mc_bytes,
            uc_packets,
            uc_bytes,
        }
    }

    /// What was sent after `before` was read.
    pub fn since(self, before: Wire) -> Wire {
        Wire {
            mc_packets: self.mc_packets - before.mc_packets,
            mc_bytes: self.mc_bytes - before.mc_bytes,
            uc_packets: self.uc_packets - before.uc_packets,
            uc_bytes: self.uc_bytes - before.uc_bytes,
        }
    }

    /// UDP payload sent to multicast groups (TFTP DATA packets, headers included).
    pub fn mc_payload(&self) -> u64 {
        self.mc_bytes - IP_UDP * self.mc_packets
    }

    /// File bytes carried by multicast DATA (payload without the TFTP DATA header).
    pub fn mc_file_bytes(&self) -> u64 {
        self.mc_payload() - DATA_HDR * self.mc_packets
    }

    /// UDP payload sent to single addresses (OACKs, unicast DATA, cluster traffic).
    pub fn uc_payload(&self) -> u64 {
        self.uc_bytes - IP_UDP * self.uc_packets
    }

    /// UDP payload sent, to groups and to single addresses.
    pub fn udp_payload(&self) -> u64 {
        self.mc_payload() + self.uc_payload()
    }

    pub fn udp_packets(&self) -> u64 {
        self.mc_packets + self.uc_packets
    }
}
