//! The `carrot` command's library half: the fixture demo and the OpenAI-compatible server, built
//! on `carrot-runtime`.

pub mod demo;
pub mod deploy;
pub mod serve;
