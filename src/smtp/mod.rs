//! The SMTP server side: parsing, replies, the session state machine, message data, and the
//! connection loop that carries out the session's decisions on a socket.

pub mod command;
pub mod connection;
pub mod data;
pub mod reply;
pub mod session;
