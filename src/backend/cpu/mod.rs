//! The CPU backend: one file per op, each with `<op>_forward` and `<op>_backward`.
//! Layouts are row-major; shapes are written beside every argument.
