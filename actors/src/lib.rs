//! Parley's control plane: actors and the pure logic they drive.
//!
//! Every user, call, device session and trunk is an actix actor. The logic that decides
//! things is written as plain state machines and functions with no I/O — the routing
//! policy ([`router`]) and the call ([`call::CallCore`]) — and the actors are thin drivers
//! that perform their actions. This crate opens no socket: it reaches the SIP stack, the
//! device connections, the media relay and the CDR store through messages
//! ([`messages::SipCommand`], [`messages::ToDevice`]) and small traits
//! ([`messages::MediaPlane`], [`messages::CdrSink`]) that the switch implements.
//!
//! Why actix: the design calls for one actor per user, call and device with typed
//! messages and bounded mailboxes; actix gives exactly that on a single-threaded tokio
//! runtime, so actor state needs no locks.
//!
//! ```
//! use parley_actors::router::{route, DeviceState, Preferences, Route};
//! use parley_codecs::control::Status;
//! let desk = DeviceState { session: 1, device: "desk".into(), status: Status::Available, idle_ms: 0, note: None, video: false };
//! assert_eq!(route(&[desk], &Preferences::default(), true), Route::Devices(vec![1]));
//! assert_eq!(route(&[], &Preferences::default(), true), Route::Trunk);
//! ```

pub mod call;
mod call_actor;
pub mod messages;
pub mod metrics;
pub mod registry;
pub mod router;
pub mod rules;
pub mod session;
pub mod trunk;
pub mod user;

pub use call_actor::{CallActor, CallEnv, CallSetup};
