//! lease: a sender's side of its pacing lease, shared by unicast sessions and multicast
//! groups. A sender registers with `pacing` before its first packet, renews every
//! `lease_every` with a report of what it sent, sends at the rate each answer grants, and
//! ends the lease with its last report.

use std::time::Instant;

use actix::prelude::*;
use tftpcast_proto::pacing::TokenBucket;

use crate::flow::pacing::{self, Pacing, Report};

/// A sender paced by a lease from [`Pacing`].
pub trait Leased: Actor<Context = Context<Self>> {
    /// The id the lease is held under.
    fn lease_id(&self) -> u64;
    /// Whether the sender sets its own rate from its receivers' reports (pacing then only
    /// applies the caps).
    fn own_rate_control(&self) -> bool {
        false
    }
    fn pacing(&self) -> &Addr<Pacing>;
    /// The bucket the granted rate applies to.
    fn bucket(&mut self) -> &mut TokenBucket;
    /// What was sent since the previous report.
    fn report(&mut self) -> Report;
    /// Sends what the bucket allows (once the first lease is in).
    fn flush(&mut self, ctx: &mut Context<Self>);
    /// Re-arms the send timer (after a renewal changed the rate).
    fn rearm(&mut self, ctx: &mut Context<Self>);
}

/// Registers and waits for the first lease (the actor handles nothing else meanwhile), so
/// the first packets already leave at the granted rate; then flushes.
pub fn register<A: Leased>(act: &mut A, ctx: &mut Context<A>) {
    act.pacing()
        .send(pacing::Register { id: act.lease_id(), own_rate_control: act.own_rate_control() })
        .into_actor(act)
        .map(|res, act, ctx| {
            if let Ok(lease) = res {
                act.bucket().set_rate_auto(Instant::now(), lease.rate);
            }
            act.flush(ctx);
        })
        .wait(ctx);
}

/// Reports and renews; a changed rate applies as soon as the answer comes.
pub fn renew<A: Leased>(act: &mut A, ctx: &mut Context<A>) {
    let report = act.report();
    act.pacing()
        .send(pacing::Renew { id: act.lease_id(), report })
        .into_actor(act)
        .map(|res, act, ctx| {
            if let Ok(lease) = res {
                if lease.rate != act.bucket().rate() {
                    act.bucket().set_rate_auto(Instant::now(), lease.rate);
                    act.rearm(ctx);
                }
            }
        })
        .spawn(ctx);
}

/// Ends the lease with the last report.
pub fn unregister<A: Leased>(act: &mut A) {
    let report = act.report();
    act.pacing().do_send(pacing::Unregister { id: act.lease_id(), report });
}
