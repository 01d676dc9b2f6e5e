//! What an MSA enforces and fixes in a submitted message, as pure functions over values:
//! who may send as which address, what the Received trace may reveal, and the RFC 6409 §8
//! header fixes. Time and randomness come in as parameters.

pub mod headers;
pub mod privacy;
pub mod sender;
