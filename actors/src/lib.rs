//! Parley's control plane: the actors that drive the pure logic of `parley-core`.
//!
//! Every user, call, device session and trunk is an actix actor, and each is a shell: it
//! turns messages into inputs of a core state machine ([`parley_core::call::CallCore`],
//! [`parley_core::presence::UserPresence`], [`parley_core::trunk::TrunkHealth`]) and the
//! core's outputs into sends. This crate opens no socket: it reaches the SIP stack, the
//! device connections, the media relay and the CDR store through messages
//! ([`messages::SipCommand`], [`messages::ToDevice`]) and small traits
//! ([`messages::MediaPlane`], [`messages::CdrSink`]) that the switch implements.
//!
//! Why actix: the design calls for one actor per user, call and device with typed
//! messages and bounded mailboxes; actix gives exactly that on a single-threaded tokio
//! runtime, so actor state needs no locks.
//!
//! ```
//! use parley_actors::registry::Registry;
//! use parley_core::directory::Directory;
//! // The cores see the registry as a directory of plain identities.
//! let registry = Registry::default();
//! assert!(registry.by_number("+15550100001").is_none());
//! ```

pub mod book;
mod call_actor;
pub mod chat;
pub mod messages;
pub mod metrics;
pub mod registry;
pub mod remote;
pub mod session;
pub mod trunk;
pub mod user;

pub use call_actor::{CallActor, CallEnv, CallSetup};
