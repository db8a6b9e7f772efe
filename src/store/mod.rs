//! The state directory, whole: volume keys, manifests, journals, locks,
//! seals.
//!
//! Owns every file under a state directory ([`state`]), the journals'
//! typed records ([`journal`]) and sealed volumes ([`seal`]). It must not
//! speak the protocol or decide a pass's policy; it keeps records and
//! answers what they say.

pub mod journal;
pub mod seal;
pub mod state;
