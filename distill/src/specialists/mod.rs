//! The paper's specialists (Hinton, Vinyals & Dean 2015, section 5), the
//! numerical building blocks: which classes each specialist covers
//! ([`clustering`]), a specialist's labels and dustbin correction
//! ([`dustbin`]), and combining a generalist with specialists at inference
//! ([`combine`], eq. 5); and built from them, training one specialist
//! ([`specialist`]) and inference with the generalist and its specialists
//! together ([`ensemble`]).

pub mod clustering;
pub mod combine;
pub mod dustbin;
pub mod ensemble;
pub mod specialist;
