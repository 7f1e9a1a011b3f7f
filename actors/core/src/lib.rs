//! Parley's control logic, pure: no actor, no socket, no clock, no random source.
//!
//! Everything here is a function or a sans-IO state machine in the str0m/quinn-proto
//! manner — `handle_*` feed inputs in with the time as an argument, `poll_*` drain what
//! the driver must do — so that every decision is a table row in a unit test and the
//! actors in `parley-actors` are thin shells:
//!
//! - [`rules`] and [`router`]: where a call rings, from the callee's presence,
//!   preferences, answer history and the voice network's state;
//! - [`call::CallCore`]: one call, from routing to the CDR (re-routing, sequential
//!   ringing, fallback to the PSTN line, media wiring, the media watchdog);
//! - [`presence::UserPresence`]: one user's devices, aggregate presence and the fan-out
//!   of changes to ringing calls and subscribers;
//! - [`trunk::TrunkHealth`]: whether the voice network is up; [`numberplan`]: which
//!   trunks reach a number, in the order to try them;
//! - [`dial`]: where a call dialled from an IM device goes; [`admission`]: who may try
//!   to log in, and how often; [`overload`]: whether the node takes one more call;
//! - [`cdr`], [`sip`], [`ids`], [`directory`]: the shapes the cores exchange.
//!
//! This crate depends on no actor framework and no runtime, which is what guarantees
//! the above. Why a separate crate rather than a module of `parley-actors`: a module
//! could import actix by accident; a crate whose `Cargo.toml` lacks it cannot.
//!
//! ```
//! use parley_core::router::{route, DeviceState, Preferences, Route};
//! use parley_codecs::control::Status;
//! let desk = DeviceState { session: 1, device: "desk".into(), status: Status::Available, idle_ms: 0, note: None, video: false, opus: false };
//! assert_eq!(route(&[desk], &Preferences::default(), true), Route::Devices(vec![1]));
//! assert_eq!(route(&[], &Preferences::default(), true), Route::Trunk);
//! ```

pub mod admission;
pub mod call;
pub mod cdr;
pub mod dial;
pub mod directory;
pub mod ids;
pub mod numberplan;
pub mod overload;
pub mod plan;
pub mod presence;
pub mod router;
pub mod rules;
pub mod sip;
pub mod trunk;
