//! From what a request asked and what its answer contained to credits: the
//! worst-case hold before forwarding, and the real cost after.

use cxmpute_store::Service;

use crate::config::Pricing;
use crate::meter::Observed;

/// What the gateway knows about a request before it is forwarded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bounds {
    /// Most input tokens the request can be (chat, embeddings).
    pub input_max: u64,
    /// Most output tokens (chat): the client's budget or the configured default.
    pub output_max: u64,
    /// Characters to speak (speech), counted exactly.
    pub characters: u64,
    /// URLs to scrape.
    pub pages_max: u64,
    /// Inputs in an embeddings request (each is at least one token).
    pub inputs: u64,
}

/// Units a finished request is charged for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Units {
    pub input: u64,
    pub output: u64,
    pub characters: u64,
    pub pages: u64,
}

fn mul(units: u64, price: i64) -> i64 {
    let v = u128::from(units) * u128::try_from(price.max(0)).unwrap_or(0);
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The most a request can cost: what is held before forwarding.
pub fn hold_amount(pricing: &Pricing, service: Service, model: &str, b: &Bounds) -> i64 {
    let (pin, pout) = pricing.unit_prices(service, model);
    let total = match service {
        Service::Chat => mul(b.input_max, pin).saturating_add(mul(b.output_max, pout)),
        Service::Embeddings => mul(b.input_max, pin),
        Service::Speech => mul(b.characters, pin),
        Service::Scrape => mul(b.pages_max, pin),
    };
    total.max(0)
}

/// The units to charge, from the node's report clamped by the gateway's bounds.
pub fn units(service: Service, b: &Bounds, seen: &Observed) -> Units {
    match service {
        Service::Chat => {
            let input = match seen.usage {
                Some(u) => u.prompt_tokens.clamp(1, b.input_max.max(1)),
                // No report: a conventional 4 bytes per token estimate.
                None => b.input_max.div_ceil(4),
            };
            // A completion has at least one token per content chunk we saw, and
            // (content bytes + chunks) bounds it from above: a token is text.
            let floor = seen.content_chunks;
            let ceiling = b.output_max.min(seen.content_bytes + seen.content_chunks).max(floor);
            let output = match seen.usage {
                Some(u) => u.completion_tokens.clamp(floor, ceiling),
                None => floor,
            };
            Units {
                input,
                output,
                ..Units::default()
            }
        }
        Service::Embeddings => {
            let input = match seen.usage {
                Some(u) => u.prompt_tokens.clamp(b.inputs, b.input_max),
                None => b.input_max.div_ceil(4).max(b.inputs),
            };
            Units {
                input,
                ..Units::default()
            }
        }
        Service::Speech => Units {
            characters: b.characters,
            ..Units::default()
        },
        Service::Scrape => Units {
            pages: seen.pages_ok.unwrap_or(0).min(b.pages_max),
            ..Units::default()
        },
    }
}

pub fn cost(pricing: &Pricing, service: Service, model: &str, u: &Units) -> i64 {
    let (pin, pout) = pricing.unit_prices(service, model);
    match service {
        Service::Chat => mul(u.input, pin).saturating_add(mul(u.output, pout)),
        Service::Embeddings => mul(u.input, pin),
        Service::Speech => mul(u.characters, pin),
        Service::Scrape => mul(u.pages, pin),
    }
}

pub fn reward(pricing: &Pricing, cost: i64) -> i64 {
    (i128::from(cost) * i128::from(pricing.reward_share_percent) / 100) as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use cxmpute_protocol::openai::Usage;

    fn usage(p: u64, c: u64) -> Option<Usage> {
        Some(Usage {
            prompt_tokens: p,
            completion_tokens: c,
            total_tokens: p + c,
        })
    }

    #[test]
    fn inflated_node_counts_are_clamped() {
        let b = Bounds {
            input_max: 100,
            output_max: 50,
            ..Bounds::default()
        };
        let seen = Observed {
            usage: usage(10_000, 10_000),
            content_chunks: 5,
            content_bytes: 20,
            ..Observed::default()
        };
        let u = units(Service::Chat, &b, &seen);
        assert_eq!(u.input, 100);
        assert_eq!(u.output, 25);
    }

    #[test]
    fn deflated_node_counts_are_raised_to_what_was_seen() {
        let b = Bounds {
            input_max: 100,
            output_max: 50,
            ..Bounds::default()
        };
        let seen = Observed {
            usage: usage(0, 1),
            content_chunks: 7,
            content_bytes: 30,
            ..Observed::default()
        };
        let u = units(Service::Chat, &b, &seen);
        assert_eq!((u.input, u.output), (1, 7));
    }

    #[test]
    fn cost_never_exceeds_hold() {
        let p = Pricing::default();
        let b = Bounds {
            input_max: 100,
            output_max: 50,
            ..Bounds::default()
        };
        let seen = Observed {
            usage: usage(1 << 40, 1 << 40),
            content_chunks: 50,
            content_bytes: 10_000,
            ..Observed::default()
        };
        let u = units(Service::Chat, &b, &seen);
        assert!(cost(&p, Service::Chat, "m", &u) <= hold_amount(&p, Service::Chat, "m", &b));
    }

    #[test]
    fn default_prices_match_the_original_list() {
        let p = Pricing::default();
        // 1,000 chat tokens at $0.0024 = 2,400,000 nano-dollars.
        assert_eq!(
            cost(
                &p,
                Service::Chat,
                "m",
                &Units {
                    input: 500,
                    output: 500,
                    ..Units::default()
                }
            ),
            2_400_000
        );
        assert_eq!(
            cost(
                &p,
                Service::Scrape,
                "m",
                &Units {
                    pages: 1,
                    ..Units::default()
                }
            ),
            13_000_000
        );
        assert_eq!(reward(&p, 1_000), 550);
    }
}
