//! Device login, like OAuth's device flow (RFC 8628): a node without a
//! browser gets a code pair, its owner approves the short code on the web,
//! and the node receives device credentials.
//!
//! - here: the user code (its alphabet, display and hashing) and the device code.
//! - [`api`]: `POST /v1/device/code` and `POST /v1/device/token` (JSON).
//! - [`page`]: `GET /link` and `POST /link`, where a signed-in owner approves.
//!
//! The store keeps only hashes of both codes. Approval is bound to the
//! signed-in account; the device is created on the first poll after approval,
//! in the transaction that consumes the code, so credentials exist once.

pub mod api;
pub mod page;

use std::time::Duration;

use cxmpute_store::ids::hash_secret;
use rand::Rng;

const HOUR: Duration = Duration::from_secs(3600);

/// Consonants only: no words can form, and no 0/O or 1/I/L look-alikes.
const ALPHABET: &[u8; 20] = b"BCDFGHJKLMNPQRSTVWXZ";
const USER_CODE_LEN: usize = 8;

/// A user code, normalised: eight letters of [`ALPHABET`], no dash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCode(String);

impl UserCode {
    /// Draws a new code (20⁸ ≈ 2.6·10¹⁰ possibilities).
    pub fn generate() -> UserCode {
        let mut rng = rand::rngs::OsRng;
        UserCode(
            (0..USER_CODE_LEN)
                .map(|_| char::from(ALPHABET[rng.gen_range(0..ALPHABET.len())]))
                .collect(),
        )
    }

    /// Reads a code as a person types it: any case, with or without the
    /// dash or spaces.
    pub fn parse(raw: &str) -> Option<UserCode> {
        let normal: String = raw
            .chars()
            .filter(|c| !matches!(c, '-' | ' ' | '\t'))
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let ok = normal.len() == USER_CODE_LEN && normal.bytes().all(|b| ALPHABET.contains(&b));
        ok.then_some(UserCode(normal))
    }

    /// `WDJB-MJHT`.
    pub fn display(&self) -> String {
        format!("{}-{}", &self.0[..4], &self.0[4..])
    }

    pub fn hash(&self) -> String {
        hash_secret(&format!("cxmpute-user-code\0{}", self.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The device code is a session-token-sized secret: 64 hex characters.
pub fn device_code_well_formed(code: &str) -> bool {
    crate::web::session::well_formed(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_codes_round_trip_through_what_people_type() {
        for _ in 0..100 {
            let code = UserCode::generate();
            assert_eq!(code.as_str().len(), 8);
            let shown = code.display();
            assert_eq!(shown.len(), 9);
            assert_eq!(UserCode::parse(&shown), Some(code.clone()));
            assert_eq!(UserCode::parse(&shown.to_lowercase()), Some(code.clone()));
            assert_eq!(UserCode::parse(&shown.replace('-', " ")), Some(code));
        }
        for bad in ["", "WDJB-MJH", "WDJB-MJHTX", "WDJB-MJH0", "AEIO-UBCD", "WDJB_MJHT"] {
            assert_eq!(UserCode::parse(bad), None, "{bad}");
        }
        assert_ne!(
            UserCode::parse("BBBB-BBBB").unwrap().hash(),
            UserCode::parse("BBBB-BBBC").unwrap().hash()
        );
    }
}
