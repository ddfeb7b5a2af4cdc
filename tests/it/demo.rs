//! `pgcrew demo` and `pgcrew init`, end to end.
