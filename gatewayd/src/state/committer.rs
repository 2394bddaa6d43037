//! The group committer: one thread that takes every hot-path write waiting for it, runs each in
//! its own savepoint inside one `BEGIN IMMEDIATE` transaction and commits once, answering each
//! caller only after the commit is on disk.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use super::{State, StateError, lock};

/// Most writes committed together.
const MAX_GROUP: usize = 1024;

/// Told whether the group's commit succeeded (`None`) or why not.
type Completion = Box<dyn FnOnce(Option<&StateError>) + Send>;
/// One write of a group: runs in its savepoint (or is told why the group could not start) and
/// returns what to do once the commit's outcome is known.
pub(super) type GroupJob = Box<dyn FnOnce(Result<&Connection, &StateError>) -> Completion + Send>;

/// The group committer: one transaction per group of waiting writes, until every sender is gone.
pub(super) fn group_committer(conn: Arc<Mutex<Connection>>, rx: mpsc::Receiver<GroupJob>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let conn = lock(&conn);
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let e = StateError::from(e);
            for job in jobs {
                job(Err(&e))(Some(&e));
            }
            continue;
        }
        let done: Vec<Completion> = jobs.into_iter().map(|job| job(Ok(&conn))).collect();
        match conn.execute_batch("COMMIT") {
            Ok(()) => done.into_iter().for_each(|d| d(None)),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                let e = StateError::CommitFailed(e.to_string());
                done.into_iter().for_each(|d| d(Some(&e)));
            }
        }
    }
}

/// Runs `f` inside a savepoint: its changes are kept if it succeeds, undone if it fails.
fn in_savepoint<R>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<R, StateError>,
) -> Result<R, StateError> {
    conn.execute_batch("SAVEPOINT op")?;
    match f(conn) {
        Ok(r) => {
            conn.execute_batch("RELEASE op")?;
            Ok(r)
        }
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO op; RELEASE op");
            Err(e)
        }
    }
}

/// Wraps a write for the group committer; `reply` gets its result once the commit's outcome is
/// known.
fn group_job<R: Send + 'static>(
    f: impl FnOnce(&Connection) -> Result<R, StateError> + Send + 'static,
    reply: impl FnOnce(Result<R, StateError>) + Send + 'static,
) -> GroupJob {
    Box::new(move |conn| {
        let result = match conn {
            Ok(c) => in_savepoint(c, f),
            Err(e) => Err(StateError::CommitFailed(e.to_string())),
        };
        Box::new(move |commit: Option<&StateError>| {
            reply(match (result, commit) {
                (Ok(_), Some(e)) => Err(StateError::CommitFailed(e.to_string())),
                (r, _) => r,
            })
        })
    })
}

impl State {
    /// Runs the write `f` in the next group commit and waits (blocking) for its durable result.
    pub(super) fn write_grouped<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StateError> + Send + 'static,
    ) -> Result<R, StateError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let job = group_job(f, move |r| {
            let _ = tx.send(r);
        });
        lock(&self.group)
            .send(job)
            .map_err(|_| StateError::WriterStopped)?;
        rx.recv().map_err(|_| StateError::WriterStopped)?
    }

    /// [`write_grouped`](Self::write_grouped) for async callers: waits without blocking a
    /// runtime thread.
    pub(super) async fn write_grouped_async<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StateError> + Send + 'static,
    ) -> Result<R, StateError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job = group_job(f, move |r| {
            let _ = tx.send(r);
        });
        lock(&self.group)
            .send(job)
            .map_err(|_| StateError::WriterStopped)?;
        rx.await.map_err(|_| StateError::WriterStopped)?
    }
}
