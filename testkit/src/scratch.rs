//! Temporary directories for a test's daemons: removed when the test passes, kept (and their
//! path printed on stderr, next to the daemons' logs in them) when it fails, or always with
//! `TESTKIT_KEEP=1`.

use std::path::Path;

/// A temporary directory kept when the test panics.
#[derive(Debug)]
pub struct Scratch(Option<tempfile::TempDir>);

/// A new temporary directory (panics if none can be made).
pub fn scratch() -> Scratch {
    let dir = tempfile::Builder::new()
        .prefix("testkit-")
        .tempdir()
        .unwrap_or_else(|e| panic_no_dir(&e));
    Scratch(Some(dir))
}

#[allow(clippy::panic)]
fn panic_no_dir(e: &std::io::Error) -> tempfile::TempDir {
    panic!("cannot create a temporary directory: {e}")
}

impl Scratch {
    /// The directory.
    pub fn path(&self) -> &Path {
        self.0
            .as_ref()
            .map_or(Path::new(""), tempfile::TempDir::path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let keep =
            std::thread::panicking() || std::env::var("TESTKIT_KEEP").is_ok_and(|v| v == "1");
        if keep && let Some(d) = self.0.take() {
            let p = d.keep();
            eprintln!(
                "--- kept the test's directory (logs inside): {}",
                p.display()
            );
        }
    }
}
