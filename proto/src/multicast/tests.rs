//! Group behaviour, on the simulated lab ([`super::sim`]) and packet by packet.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::sim::{config, file, floor, ClientSpec, Kind, Lab};
use super::*;
use crate::block::Block;
use crate::packet::{decode, ErrorCode, Packet};
use crate::transmit::{Datagram, Transmit};

type Client = u32;

fn specs(n: usize, kind: Kind, loss: f64) -> Vec<ClientSpec> {
    (0..n).map(|_| ClientSpec::new(kind).loss(loss)).collect()
}

fn mc_flag(pkt: &[u8]) -> Option<bool> {
    match decode(pkt).ok()? {
        Packet::Oack(opts) => opts.iter().find(|(k, _)| k == "multicast").map(|(_, v)| v.ends_with(",1")),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The file crosses the wire once, or as close to the floor as loss allows.
// ---------------------------------------------------------------------------------------------

#[test]
fn eight_clients_get_the_file_sent_once() {
    for kind in [Kind::InOrder, Kind::Bitmap] {
        let data = file(300_000);
        let mut lab = Lab::new(config(Instant::now()), &data, specs(8, kind, 0.0), 1);
        lab.run();
        assert!(lab.all_complete(), "{kind:?}");
        let st = lab.g.stats();
        assert_eq!(st.members_done, 8);
        assert_eq!(st.retransmits, 0, "{kind:?}: {st:?}");
        assert_eq!(st.data_packets, lab.blocks);
        assert_eq!(st.first_pass, lab.blocks);
        // The reference client finishes only as master: each leads once more at the end. A
        // bitmap client acknowledges the last block as soon as it has it, master or not.
        match kind {
            Kind::InOrder => assert_eq!(st.remasters, 7, "{st:?}"),
            Kind::Bitmap => assert!(st.remasters <= 7, "{st:?}"),
        }
        assert!(st.probes >= 2, "probes at 64 and 192 blocks: {st:?}");
    }
}

/// The bound: with N members each losing p of the packets independently, a block
/// any member lost goes out at least twice, so the floor is about 2 - (1-p)^N times the
/// blocks (exactly: E[max of N geometric variables], [`floor`]); the group stays within 1.1x
/// of it. Both kinds of client, several seeds.
#[test]
fn repairs_stay_near_the_floor_under_independent_loss() {
    let data = file(1_000_000); // 1954 blocks
    for (n, p, bound) in [(4usize, 0.05, 1.30), (32, 0.02, 1.62)] {
        let f = floor(p, n as u32);
        for kind in [Kind::InOrder, Kind::Bitmap] {
            for seed in 1..=3 {
                let mut lab = Lab::new(config(Instant::now()), &data, specs(n, kind, p), seed);
                lab.run();
                assert!(lab.all_complete(), "{n} {kind:?} seed {seed}: not everyone completed");
                let st = lab.g.stats();
                assert!(
                    lab.ratio() <= bound,
                    "{n} members at {p}, {kind:?}, seed {seed}: {:.3}x the blocks (floor {f:.3}, bound {bound}): {st:?}",
                    lab.ratio()
                );
                assert_eq!(st.repairs.late_join, 0);
                eprintln!("{n} members at {p}, {kind:?}, seed {seed}: {:.3}x (floor {f:.3}): {:?}", lab.ratio(), st.repairs);
            }
        }
    }
}

/// Without injected loss, loss comes from receivers that cannot keep up: three of eight
/// drain their receive queue (32 datagrams) at 2000 blocks a second, while the master would
/// clock the group at several times that. Probes show what they lose and the rate comes
/// down to what they keep up with: the file crosses the wire about once. Without rate
/// control they lose most of the first pass.
#[test]
fn receivers_that_cannot_keep_up_slow_the_group_down() {
    let data = file(2_000_000); // 3907 blocks
    let slow = |kind| {
        (0..8)
            .map(|c| {
                let mut s = ClientSpec::new(kind);
                if c % 3 == 1 {
                    s.capacity = Some((32, Duration::from_micros(500)));
                }
                s
            })
            .collect::<Vec<_>>()
    };
    for kind in [Kind::InOrder, Kind::Bitmap] {
        let mut on = Lab::new(config(Instant::now()), &data, slow(kind), 7);
        on.run();
        let mut cfg = config(Instant::now());
        cfg.rate.enabled = false;
        let mut off = Lab::new(cfg, &data, slow(kind), 7);
        off.run();
        assert!(on.all_complete() && off.all_complete());
        let (s_on, s_off) = (on.g.stats(), off.g.stats());
        eprintln!(
            "{kind:?}: rate control on {:.3}x ({} changes, overruns {}), off {:.3}x (overruns {})",
            on.ratio(),
            s_on.rate_changes,
            on.clients.iter().map(|c| c.overruns).sum::<u64>(),
            off.ratio(),
            off.clients.iter().map(|c| c.overruns).sum::<u64>()
        );
        assert!(s_on.rate_changes > 0 && on.events.iter().any(|(_, e)| matches!(e, Event::Rate { change: rate::RateChange::Slowed { .. }, .. })));
        assert!(on.ratio() <= 1.10, "{kind:?}: {:.3}x with rate control: {s_on:?}", on.ratio());
        assert!(off.ratio() >= 1.5, "{kind:?}: the slow receivers should lose much without it: {:.3}x", off.ratio());
        assert_eq!(s_off.rate_changes, 0);
    }
}

/// A re-mastered member with scattered holes gets exactly its holes, one sweep, no window
/// of blocks it already has.
#[test]
fn a_new_master_gets_exactly_its_scattered_holes() {
    for kind in [Kind::InOrder, Kind::Bitmap] {
        let data = file(500_000); // 977 blocks
        let mut cfg = config(Instant::now());
        cfg.probe_blocks = 0;
        let mut specs = specs(3, kind, 0.0);
        // Member 1 misses every 10th block the first time round, member 2 every 7th.
        specs[1].drop_first = Some(|b| b % 10 == 0);
        specs[2].drop_first = Some(|b| b % 7 == 0);
        let mut lab = Lab::new(cfg, &data, specs, 3);
        lab.run();
        assert!(lab.all_complete());
        let st = lab.g.stats();
        let holes_1 = (1..=lab.blocks).filter(|b| b % 10 == 0).count() as u64;
        let holes_2 = (1..=lab.blocks).filter(|b| b % 7 == 0 && b % 10 != 0).count() as u64;
        assert_eq!(st.repairs.remaster, holes_1 + holes_2, "{kind:?}: {st:?}");
        assert_eq!(st.retransmits, holes_1 + holes_2, "{kind:?}: nothing but the holes: {st:?}");
        assert_eq!(st.timeouts, 0, "{kind:?}: ACK-clocked, no timer between holes: {st:?}");
    }
}

#[test]
fn late_joiner_gets_the_blocks_it_missed_and_they_are_not_loss() {
    let data = file(200_000); // 391 blocks
    for kind in [Kind::InOrder, Kind::Bitmap] {
        let mut specs = specs(4, kind, 0.0);
        specs[3].join_after = Some(200);
        let mut lab = Lab::new(config(Instant::now()), &data, specs, 5);
        lab.run();
        assert!(lab.all_complete());
        let st = lab.g.stats();
        assert!((195..=205).contains(&st.repairs.late_join), "{kind:?}: {st:?}");
        assert_eq!(st.repairs.loss(), 0, "{kind:?}: a late join is not loss: {st:?}");
        assert_eq!(st.rate_changes, 0, "{kind:?}: {st:?}");
    }
}

#[test]
fn killed_master_is_replaced_and_others_finish() {
    let data = file(200_000);
    let mut specs = specs(4, Kind::InOrder, 0.0);
    specs[0].dies_after = Some(150);
    let mut lab = Lab::new(config(Instant::now()), &data, specs, 2);
    lab.run();
    assert!(lab.clients[1..].iter().all(|c| c.complete()));
    assert!(!lab.clients[0].complete());
    assert_eq!(lab.g.stats().members_lost, 1);
    assert_eq!(lab.g.stats().members_done, 3);
}

/// The lab case: 8 clients, 40 MiB at blksize 1428, one client behind 20% loss asks
/// first, so it leads first. It is demoted after `slow_master_repairs` losses; the others
/// then finish within 1.3x of their time without it, and it still gets everything (alone at
/// the end, by unicast), its holes and not much more.
#[test]
fn a_lossy_master_is_demoted_and_does_not_hold_the_others_back() {
    let data = file(40 << 20);
    let cfg = || {
        let mut c = config(Instant::now());
        c.blksize = 1428;
        c
    };
    for kind in [Kind::InOrder, Kind::Bitmap] {
        let mut lossy = specs(8, kind, 0.0);
        lossy[0].loss = 0.2;
        let mut lab = Lab::new(cfg(), &data, lossy, 11);
        lab.run();
        let mut clean = Lab::new(cfg(), &data, specs(8, kind, 0.0), 11);
        clean.run();
        assert!(lab.all_complete());
        let st = lab.g.stats();
        assert!(st.demotions >= 1, "{st:?}");
        let others = lab.completed_by(1..8);
        let reference = clean.completed_by(0..8);
        assert!(others.as_secs_f64() <= reference.as_secs_f64() * 1.3, "{kind:?}: others {others:?}, clean {reference:?}");
        assert!(st.unicast_data_packets > 0, "the lossy client's repairs went by unicast once it was alone");
        // Its holes (20%) and the repairs it lost again (20% of those), little else.
        assert!(lab.ratio() <= 1.3, "{kind:?}: {:.3}x: {st:?}", lab.ratio());
    }
}

#[test]
fn everyone_finishes_under_heavy_loss() {
    let data = file(150_000);
    for kind in [Kind::InOrder, Kind::Bitmap] {
        let mut lab = Lab::new(config(Instant::now()), &data, specs(4, kind, 0.2), 13);
        lab.run();
        assert!(lab.all_complete(), "{kind:?}");
        assert_eq!(lab.g.stats().members_done, 4);
        // The bound for 4 clients at 20% (floor 1.59x).
        assert!(lab.ratio() <= 2.1, "{kind:?}: {:.3}x (floor {:.3}): {:?}", lab.ratio(), floor(0.2, 4), lab.g.stats());
    }
}

// ---------------------------------------------------------------------------------------------
// Packet by packet.
// ---------------------------------------------------------------------------------------------

fn cfg(start_at: Instant, window: u16) -> GroupConfig {
    let mut c = config(start_at - Duration::from_millis(200));
    c.window = window;
    c.probe_blocks = 0;
    c.slow_master_repairs = 0;
    c.lone_member_unicast = false;
    c
}

fn drain(g: &mut Group<Client>, now: Instant) -> Vec<Transmit<GroupDest<Client>>> {
    std::iter::from_fn(|| g.poll_transmit(now)).collect()
}

fn data_blocks(outs: &[Transmit<GroupDest<Client>>]) -> Vec<u16> {
    outs.iter()
        .filter_map(|o| match o {
            Transmit { datagram: Datagram::Data { block, .. }, .. } => Some(*block),
            _ => None,
        })
        .collect()
}

/// A group of two started at t0 whose master (1) asked for block 1 at t0, 300 us after its
/// OACK went out (the round trip the group measures).
fn running(t0: Instant, window: u16, len: usize) -> Group<Client> {
    running_with(t0, cfg(t0, window), len)
}

/// The same with a configuration of the test's own.
fn running_with(t0: Instant, c: GroupConfig, len: usize) -> Group<Client> {
    let mut g: Group<Client> = Group::new(c, Bytes::from(file(len)));
    let joined = t0 - Duration::from_micros(300);
    g.join(joined, 1, vec![]);
    g.join(joined, 2, vec![]);
    drain(&mut g, joined);
    g.handle(t0, 1, &Packet::Ack(0));
    g.handle_timeout(t0);
    g
}

#[test]
fn a_hole_is_repaired_once_however_often_it_is_reported() {
    let t0 = Instant::now();
    let mut g = running(t0, 8, 50_000);
    assert_eq!(data_blocks(&drain(&mut g, t0)), (1..=8).collect::<Vec<_>>());
    // A bitmap master lost block 3: ACK 2 for every later block.
    let t = t0 + Duration::from_micros(300);
    g.handle(t, 1, &Packet::Ack(2));
    assert_eq!(data_blocks(&drain(&mut g, t)), vec![9, 10]);
    g.handle(t, 1, &Packet::Ack(2));
    assert_eq!(data_blocks(&drain(&mut g, t)), vec![3], "the hole, nothing else");
    // The same hole reported for the blocks still on their way: within a round trip of the
    // repair, nothing more goes out.
    for i in 1..5 {
        g.handle(t + Duration::from_micros(10 * i), 1, &Packet::Ack(2));
    }
    assert_eq!(data_blocks(&drain(&mut g, t)), Vec::<u16>::new());
    assert_eq!(g.stats().duplicate_acks, 4);
    // It kept 4..=10: its next ACK jumps, and sending resumes at the frontier.
    g.handle(t, 1, &Packet::Ack(10));
    assert_eq!(data_blocks(&drain(&mut g, t)), (11..=18).collect::<Vec<_>>());
    assert_eq!(g.stats().repairs.hole, 1);
    assert_eq!(g.window(), 8, "a master that keeps blocks after a hole keeps the full window");
}

/// The reference client as master ACKs once more on any block it already has. Taken for a
/// hole, that echo would resend the block just sent, whose second copy draws the next echo,
/// block after block: in lock-step nothing can report a hole, only the timer.
#[test]
fn an_echo_is_not_a_hole() {
    let t0 = Instant::now();
    let mut g = running(t0, 1, 50_000);
    assert_eq!(data_blocks(&drain(&mut g, t0)), vec![1]);
    let t = t0 + Duration::from_micros(300);
    g.handle(t, 1, &Packet::Ack(1));
    assert_eq!(data_blocks(&drain(&mut g, t)), vec![2]);
    g.handle(t + Duration::from_micros(5), 1, &Packet::Ack(1));
    assert_eq!(data_blocks(&drain(&mut g, t)), Vec::<u16>::new(), "no block followed 2: no hole to report");
    g.handle(t + Duration::from_micros(300), 1, &Packet::Ack(2));
    assert_eq!(data_blocks(&drain(&mut g, t)), vec![3]);
    assert_eq!(g.stats().retransmits, 0);
    assert_eq!(g.stats().duplicate_acks, 1);
    // A block really lost in lock-step: the timer.
    let late = g.poll_timeout().unwrap();
    g.handle_timeout(late);
    assert_eq!(data_blocks(&drain(&mut g, late)), vec![3]);
    assert_eq!(g.stats().repairs.timeout, 1);
}

#[test]
fn an_in_order_master_that_drops_blocks_after_a_hole_narrows_the_window() {
    let t0 = Instant::now();
    let mut g = running(t0, 8, 50_000);
    drain(&mut g, t0);
    let t = t0 + Duration::from_micros(300);
    g.handle(t, 1, &Packet::Ack(1));
    drain(&mut g, t);
    // Block 3 lost: one extra ACK 2 on block 4, then silence about 5..=9.
    g.handle(t, 1, &Packet::Ack(2));
    drain(&mut g, t);
    g.handle(t, 1, &Packet::Ack(2));
    assert_eq!(data_blocks(&drain(&mut g, t)), vec![3]);
    // It ACKs exactly the repaired block: it dropped 4..=9, which go again, a growing run.
    g.handle(t, 1, &Packet::Ack(3));
    assert_eq!(data_blocks(&drain(&mut g, t)), vec![4, 5]);
    assert!(g.window() < 8, "one loss narrows the window for an in-order master: {}", g.window());
}

#[test]
fn delayed_start_then_early_start_with_enough_clients() {
    let t0 = Instant::now();
    let mut g: Group<Client> = Group::new(cfg(t0 + Duration::from_secs(5), 4), Bytes::from(file(5000)));
    g.join(t0, 1, vec![]);
    drain(&mut g, t0);
    g.handle(t0, 1, &Packet::Ack(0));
    assert!(g.poll_transmit(t0).is_none(), "no DATA before the start delay");
    assert!(g.poll_timeout().unwrap() <= t0 + Duration::from_secs(5));
    let mut c = cfg(t0 + Duration::from_secs(5), 4);
    c.start_min_clients = 2;
    let mut g: Group<Client> = Group::new(c, Bytes::from(file(5000)));
    g.join(t0, 1, vec![]);
    g.handle(t0, 1, &Packet::Ack(0));
    drain(&mut g, t0);
    g.join(t0, 2, vec![]);
    let outs = drain(&mut g, t0);
    assert_eq!(outs.iter().filter(|o| matches!(o, Transmit { to: GroupDest::Group, .. })).count(), 4);
    assert!(std::iter::from_fn(|| g.poll_event()).any(|e| e == Event::Started { members: 2, early: true }));
}

#[test]
fn unexpected_packet_flood_is_bounded() {
    let t0 = Instant::now();
    let mut g = running(t0, 1, 50_000);
    drain(&mut g, t0);
    let before = g.stats().data_packets;
    // 1000 ACKs from a member that is not master, within 10 ms.
    for i in 0..1000u32 {
        let now = t0 + Duration::from_micros(i as u64 * 10);
        g.handle(now, 2, &Packet::Ack(3));
        drain(&mut g, now);
    }
    let st = g.stats();
    assert!(st.data_packets - before <= 1, "{} retransmissions for 1000 unexpected ACKs", st.data_packets - before);
    assert_eq!(st.unexpected, 1000);
}

#[test]
fn a_stalled_stream_resends_its_most_recent_block_on_an_unexpected_packet() {
    let t0 = Instant::now();
    let mut g = running(t0, 1, 50_000);
    assert_eq!(data_blocks(&drain(&mut g, t0)), vec![1]);
    g.handle(t0, 1, &Packet::Ack(1));
    assert_eq!(data_blocks(&drain(&mut g, t0)), vec![2]);
    // Right after it went out, an old ACK from the master changes nothing...
    g.handle(t0, 1, &Packet::Ack(0));
    assert!(data_blocks(&drain(&mut g, t0)).is_empty());
    // ...a round trip later it is sent again.
    let t = t0 + Duration::from_millis(60);
    g.handle(t, 1, &Packet::Ack(0));
    assert_eq!(data_blocks(&drain(&mut g, t)), vec![2]);
    assert_eq!(g.stats().repairs.unexpected, 1);
}

#[test]
fn probes_hand_the_lead_round_and_the_old_masters_late_acks_are_ignored() {
    let t0 = Instant::now();
    let mut c = cfg(t0, 8);
    c.probe_blocks = 64;
    let mut g: Group<Client> = Group::new(c, Bytes::from(file(200_000)));
    g.join(t0, 1, vec![]);
    g.join(t0, 2, vec![]);
    g.handle_timeout(t0);
    drain(&mut g, t0);
    g.handle(t0, 1, &Packet::Ack(0));
    let mut t = t0;
    let mut acked = 0u16;
    while g.master() == Some(1) {
        t += Duration::from_micros(100);
        drain(&mut g, t);
        acked += 1;
        g.handle(t, 1, &Packet::Ack(acked));
    }
    assert!((56..=64).contains(&acked), "the first probe after 64 blocks sent: {acked}");
    let outs = drain(&mut g, t);
    let flags: Vec<(Client, Option<bool>)> = outs
        .iter()
        .filter_map(|o| match o {
            Transmit { to: GroupDest::Client(to), datagram: Datagram::Control(packet) } => Some((*to, mc_flag(packet))),
            _ => None,
        })
        .collect();
    assert_eq!(flags, vec![(1, Some(false)), (1, Some(false)), (2, Some(true))], "told twice it is passive, then the next leads");
    // ACKs from the old master still on the way: no retransmission.
    g.handle(t, 1, &Packet::Ack(acked));
    assert!(drain(&mut g, t).is_empty());
    assert_eq!(g.stats().probes, 1);
}

/// A master that acknowledges the same block forever (a broken or hostile client) is not
/// silent, but makes no progress: it is dropped after `give_up_after`, and the others finish.
#[test]
fn a_master_stuck_on_one_hole_is_dropped_and_the_others_finish() {
    let t0 = Instant::now();
    let mut c = cfg(t0, 8);
    c.give_up_after = Duration::from_secs(2);
    let mut g = running_with(t0, c, 20_000);
    drain(&mut g, t0);
    let mut t = t0;
    let mut sent = 0;
    while g.master() == Some(1) {
        t += Duration::from_millis(1);
        if g.poll_timeout().is_some_and(|d| d <= t) {
            g.handle_timeout(t);
        }
        g.handle(t, 1, &Packet::Ack(0));
        sent += data_blocks(&drain(&mut g, t)).len();
        assert!(t - t0 < Duration::from_secs(10), "the stuck master was never dropped");
    }
    assert!(t - t0 >= Duration::from_secs(2) && t - t0 < Duration::from_secs(3), "dropped after {:?}", t - t0);
    // At most one repair per two round trips (the floor here is 50 ms) while it was stuck.
    assert!(sent <= 2000 / 100 + 10, "{sent} blocks resent to a stuck master");
    assert_eq!(g.master(), Some(2));
    assert_eq!(g.stats().members_lost, 1);
}

#[test]
fn stranger_gets_error_5_and_oack_is_resent_on_repeat_request() {
    let t0 = Instant::now();
    let mut g: Group<Client> = Group::new(cfg(t0, 1), Bytes::from(file(5000)));
    g.join(t0, 1, vec![("tsize".into(), "5000".into())]);
    let first = g.poll_transmit(t0).unwrap();
    // Repeated within a round trip (a burst, or spoofed): no OACK again.
    for i in 0..100 {
        g.join(t0 + Duration::from_micros(i), 1, vec![("tsize".into(), "5000".into())]);
    }
    assert!(g.poll_transmit(t0).is_none(), "a burst of repeated requests multiplied the OACK");
    // Its first OACK was lost and it asked again a while later: the OACK again, once per
    // round trip however often it asks meanwhile.
    let later = t0 + Duration::from_secs(1);
    g.join(later, 1, vec![("tsize".into(), "5000".into())]);
    assert_eq!(g.poll_transmit(later).unwrap(), first);
    g.join(later + Duration::from_millis(1), 1, vec![("tsize".into(), "5000".into())]);
    assert!(g.poll_transmit(later).is_none(), "two OACKs within a round trip");
    let t0 = later;
    g.handle(t0, 9, &Packet::Ack(1));
    let Some(Transmit { to: GroupDest::Client(9), datagram: Datagram::Control(packet) }) = g.poll_transmit(t0) else { panic!() };
    assert!(matches!(decode(&packet), Ok(Packet::Error { code: ErrorCode::UnknownTid, .. })));
    assert_eq!(g.members(), 1);
}

#[test]
fn a_finished_members_repeated_final_ack_gets_no_error() {
    let t0 = Instant::now();
    let mut g: Group<Client> = Group::new(cfg(t0, 1), Bytes::from(file(1000)));
    g.join(t0, 1, vec![]);
    g.join(t0, 2, vec![]);
    while g.poll_transmit(t0).is_some() {}
    let last = Block(g.total_blocks()).wire();
    g.handle(t0, 1, &Packet::Ack(last));
    assert!(!g.is_member(&1) && g.finished_recently(&1));
    while g.poll_transmit(t0).is_some() {}
    // Its final ACK again: silence. Anything else from it, or any stranger: ERROR 5.
    g.handle(t0, 1, &Packet::Ack(last));
    assert!(g.poll_transmit(t0).is_none(), "a finished member's repeated final ACK was answered");
    g.handle(t0, 1, &Packet::Ack(0));
    assert!(matches!(g.poll_transmit(t0), Some(Transmit { to: GroupDest::Client(1), datagram: Datagram::Control(_) })));
    g.handle(t0, 9, &Packet::Ack(last));
    assert!(matches!(g.poll_transmit(t0), Some(Transmit { to: GroupDest::Client(9), datagram: Datagram::Control(_) })));
}

#[test]
fn take_over_promotes_the_oldest_member_which_gets_its_holes() {
    let t0 = Instant::now();
    let data = file(20_000);
    let mut g: Group<Client> = Group::new(cfg(t0 + Duration::from_secs(5), 4), Bytes::from(data.clone()));
    g.take_over(t0, vec![(7, vec![]), (8, vec![])]);
    assert!(g.started());
    let Some(Transmit { to: GroupDest::Client(7), datagram: Datagram::Control(packet) }) = g.poll_transmit(t0) else { panic!("OACK to the oldest member") };
    assert_eq!(mc_flag(&packet), Some(true));
    // Member 7 had blocks 1..=10: it asks for 11, and DATA resumes there without delay.
    g.handle(t0, 7, &Packet::Ack(10));
    let Some(Transmit { to: GroupDest::Group, datagram: Datagram::Data { block: 11, .. } }) = g.poll_transmit(t0) else { panic!("block 11") };
    let drained = g.drain_members();
    assert_eq!(drained.iter().map(|m| m.0).collect::<Vec<_>>(), vec![7, 8]);
    assert!(g.poll_transmit(t0).is_none());
    assert_eq!(g.poll_timeout(), None);
}

#[test]
fn rollover_limit() {
    assert!(fits_without_rollover(65534 * 512, 512));
    assert!(!fits_without_rollover(65535 * 512, 512));
    assert!(fits_without_rollover(40 << 20, 1428));
}
