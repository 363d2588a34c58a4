//! The scheduled jobs (schema 5): each sealed under its id. Ids count up and are never reused,
//! so `/定时任务 取消 3` cannot reach a job made after job 3 was cancelled. A job that cannot be
//! read is left out (and logged), not allowed to stop the others.

use redb::{ReadableDatabase, ReadableTable};

use super::{JOBS, SETTINGS, Store, StoreError, WriteOp, WriteOutcome, u64_key};
use crate::{dingtalk::message::RobotMessage, schedule::Job};

/// The setting that holds the last id given.
const LAST_ID: &str = "jobs.last_id";

impl Store {
    /// Every job, by id.
    pub fn jobs(&self) -> Result<Vec<(u64, Job)>, StoreError> {
        let txn = self.handle()?.begin_read().map_err(|e| self.err(e))?;
        let table = match txn.open_table(JOBS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(self.err(e)),
        };
        let mut out = Vec::new();
        for row in table.iter().map_err(|e| self.err(e))? {
            let (k, v) = row.map_err(|e| self.err(e))?;
            match self.open_value("jobs", &u64_key(k.value()), v.value()) {
                Ok(job) => out.push((k.value(), job)),
                Err(e) => log::warn!("job #{} cannot be read and is left out: {e}", k.value()),
            }
        }
        Ok(out)
    }

    /// One job.
    pub fn job(&self, id: u64) -> Result<Option<Job>, StoreError> {
        let txn = self.handle()?.begin_read().map_err(|e| self.err(e))?;
        let table = match txn.open_table(JOBS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        let value = table.get(id).map_err(|e| self.err(e))?;
        value.map(|v| self.open_value("jobs", &u64_key(id), v.value())).transpose()
    }

    /// Keep a new job; its id, and whether it is new: a job with the same `origin` (the same
    /// message answered again after a crash) is the one already kept, ended or not.
    pub fn add_job(&self, job: &Job) -> Result<(u64, bool), StoreError> {
        let txn = self.handle()?.begin_write().map_err(|e| self.err(e))?;
        {
            let jobs = txn.open_table(JOBS).map_err(|e| self.err(e))?;
            for row in jobs.iter().map_err(|e| self.err(e))? {
                let (k, v) = row.map_err(|e| self.err(e))?;
                if let Ok(kept) = self.open_value::<Job>("jobs", &u64_key(k.value()), v.value())
                    && kept.origin == job.origin
                {
                    return Ok((k.value(), false));
                }
            }
        }
        let id = {
            let mut settings = txn.open_table(SETTINGS).map_err(|e| self.err(e))?;
            let last: u64 = match settings.get(LAST_ID).map_err(|e| self.err(e))? {
                Some(v) => self.open_value::<String>("settings", LAST_ID.as_bytes(), v.value())?.parse().unwrap_or(0),
                None => 0,
            };
            let mut jobs = txn.open_table(JOBS).map_err(|e| self.err(e))?;
            let highest = jobs.last().map_err(|e| self.err(e))?.map(|(k, _)| k.value()).unwrap_or(0);
            let id = last.max(highest) + 1;
            settings
                .insert(LAST_ID, self.seal_value("settings", LAST_ID.as_bytes(), &id.to_string()).as_slice())
                .map_err(|e| self.err(e))?;
            jobs.insert(id, self.seal_value("jobs", &u64_key(id), job).as_slice()).map_err(|e| self.err(e))?;
            id
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok((id, true))
    }

    /// Remove job `id`.
    pub fn remove_job(&self, id: u64) -> Result<(), StoreError> {
        self.write(&[WriteOp::Job { id, job: None, expected: None }]).map(drop)
    }

    /// Change job `id` as `change` says, read and written in one commit (so a firing in between
    /// is not undone). `change` returns whether to write. The job after, or `None` when there is
    /// no such job.
    pub fn update_job(&self, id: u64, change: impl FnOnce(&mut Job) -> bool) -> Result<Option<Job>, StoreError> {
        let txn = self.handle()?.begin_write().map_err(|e| self.err(e))?;
        let after = {
            let mut jobs = txn.open_table(JOBS).map_err(|e| self.err(e))?;
            let found: Option<Job> = match jobs.get(id).map_err(|e| self.err(e))? {
                Some(v) => Some(self.open_value("jobs", &u64_key(id), v.value())?),
                None => None,
            };
            let Some(mut job) = found else { return Ok(None) };
            if change(&mut job) {
                jobs.insert(id, self.seal_value("jobs", &u64_key(id), &job).as_slice()).map_err(|e| self.err(e))?;
            }
            job
        };
        txn.commit().map_err(|e| self.err(e))?;
        Ok(Some(after))
    }

    /// Fire an occurrence of job `id`, which was `before` when the scheduler read it: the job as
    /// it is after (or removed), and the messages it puts in the inbox, in one commit. Each
    /// message's inbox sequence number (`None` for one recorded before: that occurrence already
    /// fired); `None` in all when the job changed meanwhile (nothing was written).
    pub fn fire_job(
        &self,
        id: u64,
        before: &Job,
        after: Option<&Job>,
        messages: &[RobotMessage],
        now_ms: i64,
    ) -> Result<Option<Vec<Option<u64>>>, StoreError> {
        let batch: Vec<(RobotMessage, bool)> = messages.iter().map(|m| (m.clone(), true)).collect();
        let ops = [WriteOp::Job { id, job: after, expected: Some(before) }, WriteOp::Accept { batch: &batch, now_ms }];
        let out = self.write(&ops)?;
        Ok(match out.as_slice() {
            [WriteOutcome::Stale] => None,
            [_, WriteOutcome::Accepted(a)] => Some(
                a.iter()
                    .map(|a| match a {
                        super::Acceptance::Queued(seq) => Some(*seq),
                        _ => None,
                    })
                    .collect(),
            ),
            _ => Some(Vec::new()),
        })
    }
}
