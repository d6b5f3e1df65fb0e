//! theory (in progress)
