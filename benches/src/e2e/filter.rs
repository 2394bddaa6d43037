//! (being written)

use super::{Env, SuiteReport};

pub fn run(_env: &Env) -> anyhow::Result<SuiteReport> {
    anyhow::bail!("the filter suite is not written yet")
}
