//! Operator tools and dashboard aggregates on SQLite: the shared SQL of
//! `crate::admin`, writes through the single writer connection.

crate::impl_admin_store!(super::SqliteStore, read = reader, write = writer, begin = begin_write);
