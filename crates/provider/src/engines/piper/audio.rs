//! Audio out: the response formats of OpenAI's `/v1/audio/speech` that we can
//! produce without a native codec library beyond LAME.
//!
//! - `pcm`: raw 16-bit signed little-endian mono at **24 kHz**, as OpenAI
//!   documents it (clients play it without a header), resampled from the voice.
//! - `wav`: 16-bit mono at the voice's own rate, sent whole (exact sizes in the header).
//! - `flac`: lossless, the voice's rate, sent whole.
//! - `mp3`: 64 kbit/s mono (LAME), the voice's rate, streamed frame by frame.
//!
//! `opus` and `aac` are refused with a clear error rather than sent mislabelled.

use anyhow::{anyhow, Context, Result};

/// OpenAI's `pcm` format is 24 kHz.
pub const PCM_RATE: u32 = 24_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Mp3,
    Wav,
    Flac,
    Pcm,
}

impl Format {
    /// Parses `response_format`; `None` (absent) is OpenAI's default, mp3.
    pub fn parse(name: Option<&str>) -> Result<Self, String> {
        match name.map(str::trim) {
            None | Some("mp3") => Ok(Self::Mp3),
            Some("wav") => Ok(Self::Wav),
            Some("flac") => Ok(Self::Flac),
            Some("pcm") => Ok(Self::Pcm),
            Some(other @ ("opus" | "aac")) => Err(format!(
                "response_format '{other}' is not available from this voice; use mp3, wav, flac or pcm"
            )),
            Some(other) => Err(format!("unknown response_format '{other}'; use mp3, wav, flac or pcm")),
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Mp3 => "audio/mpeg",
            Self::Wav => "audio/wav",
            Self::Flac => "audio/flac",
            Self::Pcm => "audio/pcm",
        }
    }

    /// Formats whose header holds the length are sent in one piece; the others
    /// are streamed sentence by sentence.
    pub fn streams(self) -> bool {
        matches!(self, Self::Mp3 | Self::Pcm)
    }
}

/// Float samples (any range) → 16-bit, peak-normalised so the loudest sample
/// sits near full scale (the model's raw output level varies by sentence).
pub fn to_i16_normalised(samples: &[f32]) -> Vec<i16> {
    let peak = samples.iter().fold(0.0f32, |m, s| m.max(s.abs())).max(0.01);
    let scale = 32_767.0 / peak;
    samples
        .iter()
        .map(|s| (s * scale).clamp(-32_768.0, 32_767.0) as i16)
        .collect()
}

/// Linear-interpolation resampler that keeps its position across chunks, so a
/// stream resampled sentence by sentence has no clicks at the joins.
pub struct Resampler {
    step: f64,
    /// Position of the next output sample, in input samples, relative to `last`.
    pos: f64,
    last: Option<i16>,
}

impl Resampler {
    pub fn new(from: u32, to: u32) -> Self {
        Self {
            step: f64::from(from) / f64::from(to),
            pos: 0.0,
            last: None,
        }
    }

    pub fn push(&mut self, input: &[i16]) -> Vec<i16> {
        let mut out = Vec::with_capacity((input.len() as f64 / self.step) as usize + 2);
        // Index -1 is the last sample of the previous chunk.
        let at = |i: isize| -> Option<f64> {
            if i < 0 {
                self.last.map(f64::from)
            } else {
                input.get(i as usize).map(|&s| f64::from(s))
            }
        };
        let offset = if self.last.is_some() { -1.0 } else { 0.0 };
        let mut pos = self.pos + offset;
        loop {
            let base = pos.floor();
            let (Some(a), Some(b)) = (at(base as isize), at(base as isize + 1)) else {
                break;
            };
            let t = pos - base;
            out.push((a + (b - a) * t).round() as i16);
            pos += self.step;
        }
        if let Some(&l) = input.last() {
            // Next chunk's index -1 is this chunk's last sample.
            self.pos = pos - (input.len() as f64 - 1.0);
            self.last = Some(l);
        } else {
            self.pos = pos - offset;
        }
        out
    }
}

pub fn pcm_bytes(samples: &[i16]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// A complete WAV file (RIFF, 16-bit PCM, mono).
pub fn wav(samples: &[i16], rate: u32) -> Vec<u8> {
    let data_len = (samples.len() * 2) as u32;
    let mut out = Vec::with_capacity(44 + samples.len() * 2);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 2).to_le_bytes()); // bytes per second
    out.extend_from_slice(&2u16.to_le_bytes()); // block align
    out.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    out.extend_from_slice(&pcm_bytes(samples));
    out
}

/// A complete FLAC file (16-bit mono).
pub fn flac(samples: &[i16], rate: u32) -> Result<Vec<u8>> {
    use flacenc::component::BitRepr;
    use flacenc::error::Verify;

    let config = flacenc::config::Encoder::default()
        .into_verified()
        .map_err(|(_, e)| anyhow!("FLAC encoder config: {e:?}"))?;
    let wide: Vec<i32> = samples.iter().map(|&s| i32::from(s)).collect();
    let source = flacenc::source::MemSource::from_samples(&wide, 1, 16, rate as usize);
    let stream = flacenc::encode_with_fixed_block_size(&config, source, config.block_size)
        .map_err(|e| anyhow!("FLAC encoding failed: {e:?}"))?;
    let mut sink = flacenc::bitsink::ByteSink::new();
    stream
        .write(&mut sink)
        .map_err(|e| anyhow!("FLAC encoding failed: {e:?}"))?;
    Ok(sink.into_inner())
}

/// MP3 encoder fed chunk by chunk.
pub struct Mp3 {
    encoder: mp3lame_encoder::Encoder,
}

impl Mp3 {
    pub fn new(rate: u32) -> Result<Self> {
        let encoder = mp3lame_encoder::Builder::new()
            .context("LAME could not allocate an encoder")?
            .with_num_channels(1)
            .and_then(|b| b.with_sample_rate(rate))
            .and_then(|b| b.with_brate(mp3lame_encoder::Bitrate::Kbps64))
            .and_then(|b| b.with_quality(mp3lame_encoder::Quality::Good))
            .map_err(|e| anyhow!("LAME setup: {e:?}"))?
            .build()
            .map_err(|e| anyhow!("LAME setup: {e:?}"))?;
        Ok(Self { encoder })
    }

    pub fn encode(&mut self, samples: &[i16]) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(mp3lame_encoder::max_required_buffer_size(samples.len()));
        self.encoder
            .encode_to_vec(mp3lame_encoder::MonoPcm(samples), &mut out)
            .map_err(|e| anyhow!("MP3 encoding failed: {e:?}"))?;
        Ok(out)
    }

    pub fn finish(&mut self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(7200);
        self.encoder
            .flush_to_vec::<mp3lame_encoder::FlushNoGap>(&mut out)
            .map_err(|e| anyhow!("MP3 encoding failed: {e:?}"))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(n: usize, rate: u32) -> Vec<i16> {
        (0..n)
            .map(|i| ((i as f32 * 440.0 * std::f32::consts::TAU / rate as f32).sin() * 12_000.0) as i16)
            .collect()
    }

    #[test]
    fn formats_parse_with_mp3_as_the_default() {
        assert_eq!(Format::parse(None), Ok(Format::Mp3));
        assert_eq!(Format::parse(Some("wav")), Ok(Format::Wav));
        assert!(Format::parse(Some("opus")).is_err_and(|e| e.contains("not available")));
        assert!(Format::parse(Some("ogg")).is_err_and(|e| e.contains("unknown")));
    }

    #[test]
    fn normalising_brings_the_peak_to_full_scale() {
        let out = to_i16_normalised(&[0.0, 0.25, -0.5]);
        assert_eq!(out, vec![0, 16_383, -32_767]);
        // Silence stays silence (no division by zero).
        assert_eq!(to_i16_normalised(&[0.0, 0.0]), vec![0, 0]);
    }

    #[test]
    fn wav_header_matches_the_data() {
        let w = wav(&[1, -1, 2], 22_050);
        assert_eq!(&w[0..4], b"RIFF");
        assert_eq!(u32::from_le_bytes([w[4], w[5], w[6], w[7]]), 36 + 6);
        assert_eq!(u32::from_le_bytes([w[24], w[25], w[26], w[27]]), 22_050);
        assert_eq!(u32::from_le_bytes([w[40], w[41], w[42], w[43]]), 6);
        assert_eq!(w.len(), 44 + 6);
    }

    #[test]
    fn resampling_in_chunks_equals_resampling_at_once() {
        let input = tone(22_050, 22_050);
        let mut whole = Resampler::new(22_050, PCM_RATE);
        let all = whole.push(&input);
        let mut parts = Resampler::new(22_050, PCM_RATE);
        let mut joined = Vec::new();
        for chunk in input.chunks(1_000) {
            joined.extend(parts.push(chunk));
        }
        // One second in, about one second out at the new rate.
        assert!((all.len() as i64 - PCM_RATE as i64).abs() <= 2, "{}", all.len());
        assert_eq!(all.len(), joined.len());
        assert!(all.iter().zip(&joined).all(|(a, b)| (a - b).abs() <= 1));
    }

    #[test]
    fn flac_output_is_a_flac_stream() {
        let f = flac(&tone(10_000, 22_050), 22_050).expect("flac");
        assert_eq!(&f[0..4], b"fLaC");
        // Lossless but compressed: a pure tone packs well below raw size.
        assert!(f.len() < 20_000, "{} bytes", f.len());
    }

    #[test]
    fn mp3_output_has_frame_syncs() {
        let mut enc = Mp3::new(22_050).expect("lame");
        let mut out = enc.encode(&tone(22_050, 22_050)).expect("encode");
        out.extend(enc.finish().expect("flush"));
        let sync = out.windows(2).position(|w| w[0] == 0xFF && w[1] & 0xE0 == 0xE0);
        assert!(sync.is_some(), "no MPEG frame sync in {} bytes", out.len());
        // 1 s at 64 kbit/s is about 8 KB.
        assert!((6_000..12_000).contains(&out.len()), "{} bytes", out.len());
    }
}
