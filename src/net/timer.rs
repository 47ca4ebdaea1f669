//! One lazily re-armed timer per actor (STYLE: "the actor arms one run_later for the next
//! deadline"). Deadlines move later on almost every packet; instead of cancelling and
//! re-arming each time, an armed timer that fires earlier than needed just re-arms itself.

use std::time::Instant;

use actix::prelude::*;

#[derive(Default)]
pub struct Timer {
    armed: Option<(SpawnHandle, Instant)>,
}

impl Timer {
    /// Makes sure `fire` runs at or before `want`.
    pub fn arm<A>(&mut self, ctx: &mut Context<A>, want: Instant, fire: fn(&mut A, &mut Context<A>))
    where
        A: Actor<Context = Context<A>>,
        A: AsMut<Timer>,
    {
        if let Some((_, at)) = self.armed {
            if at <= want {
                return;
            }
        }
        if let Some((h, _)) = self.armed.take() {
            ctx.cancel_future(h);
        }
        let delay = want.saturating_duration_since(Instant::now());
        let h = ctx.run_later(delay, move |act, ctx| {
            act.as_mut().armed = None;
            fire(act, ctx);
        });
        self.armed = Some((h, want));
    }
}

/// The earlier of two optional instants.
pub fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}
