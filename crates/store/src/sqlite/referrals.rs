//! Referral codes and payouts on SQLite: the shared SQL of `crate::referrals`.
//! A payout run is one `BEGIN IMMEDIATE` transaction, so two runs queue.

crate::impl_referral_store!(super::SqliteStore, read = reads, write = writer, begin = begin_write);
