//! Referral codes and payouts on PostgreSQL: the shared SQL of
//! `crate::referrals`. Two payout runs of one day at once: the second's
//! insert of a ledger key waits on the first's uncommitted one and then
//! does nothing, so each payout still happens once.

crate::impl_referral_store!(super::PgStore, read = reads, write = pool, begin = begin_tx);
