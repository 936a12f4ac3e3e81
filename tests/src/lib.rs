//! End-to-end tests of Murmur live in `tests/`; this library is empty.
