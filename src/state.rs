//! Operators inspect actor state through logs: every actor answers [`DumpState`] with one
//! `state` event (DESIGN.md section 4). SIGUSR1 and the `--state-interval-s` timer broadcast it.

use actix::prelude::*;

/// Ask an actor to log its state as one `state` event.
#[derive(Message, Clone, Copy, Debug)]
#[rtype(result = "()")]
pub struct DumpState;
