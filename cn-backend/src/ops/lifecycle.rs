//! Lifecycle of subscriptions and credentials: adding a parent, changing its policy or status
//! (suspending or revoking it revokes its children in the same transaction), and revoking one
//! child; each change is audited in its transaction.

use crate::model::{NewParent, ParentPolicy, SubscriptionStatus, Supi, Timestamp};
use crate::store::{AuditAction, AuditEvent, Store, StoreError, transact};

/// Revokes one child credential. Returns false (and audits nothing) if it was already revoked.
pub fn revoke_child<S: Store + ?Sized>(
    store: &S,
    supi: &Supi,
    actor: &str,
    now: Timestamp,
) -> Result<bool, StoreError> {
    transact(store, |tx| {
        let child = tx
            .child(supi)?
            .ok_or_else(|| StoreError::ChildNotFound(supi.clone()))?;
        // Parent before child, the order of every batch: the revocation moves the parent's
        // live-children counter (PostgreSQL would otherwise see a lock-order deadlock).
        tx.lock_parent(&child.parent)?;
        let changed = tx.revoke_child(supi, now)?;
        if changed {
            tx.enqueue_sync(supi, now)?;
            tx.append_audit(&AuditEvent {
                at: now,
                actor: actor.to_owned(),
                action: AuditAction::Revoke,
                supi: supi.clone(),
                parent: Some(child.parent.clone()),
                device_id: Some(child.device_id.clone()),
                request_id: None,
                detail: String::new(),
            })?;
        }
        Ok(changed)
    })
}

/// Result of a parent status change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    /// Status before.
    pub from: SubscriptionStatus,
    /// Status after.
    pub to: SubscriptionStatus,
    /// Children revoked by the change (suspend and revoke revoke every active child).
    pub revoked_children: Vec<Supi>,
}

/// Changes a parent's status. Suspending or revoking also revokes all its active children in the
/// same transaction. `revoked` is terminal; setting the current status again is a no-op.
pub fn set_parent_status<S: Store + ?Sized>(
    store: &S,
    supi: &Supi,
    to: SubscriptionStatus,
    actor: &str,
    now: Timestamp,
) -> Result<StatusChange, StoreError> {
    transact(store, |tx| {
        let parent = tx
            .lock_parent(supi)?
            .ok_or_else(|| StoreError::ParentNotFound(supi.clone()))?;
        let from = parent.status;
        if from == to {
            return Ok(StatusChange {
                from,
                to,
                revoked_children: Vec::new(),
            });
        }
        if from == SubscriptionStatus::Revoked {
            return Err(StoreError::InvalidTransition {
                supi: supi.clone(),
                from,
                to,
            });
        }
        tx.set_parent_status(supi, to, now)?;
        let action = match to {
            SubscriptionStatus::Active => AuditAction::Resume,
            SubscriptionStatus::Suspended => AuditAction::Suspend,
            SubscriptionStatus::Revoked => AuditAction::Revoke,
        };
        tx.append_audit(&AuditEvent {
            at: now,
            actor: actor.to_owned(),
            action,
            supi: supi.clone(),
            parent: None,
            device_id: None,
            request_id: None,
            detail: format!("{from} -> {to}"),
        })?;
        let mut revoked_children = Vec::new();
        if to != SubscriptionStatus::Active {
            for child in tx.revoke_children_of(supi, now)? {
                tx.enqueue_sync(&child.supi, now)?;
                tx.append_audit(&AuditEvent {
                    at: now,
                    actor: actor.to_owned(),
                    action: AuditAction::Revoke,
                    supi: child.supi.clone(),
                    parent: Some(supi.clone()),
                    device_id: Some(child.device_id.clone()),
                    request_id: None,
                    detail: format!("parent {to}"),
                })?;
                revoked_children.push(child.supi);
            }
        }
        Ok(StatusChange {
            from,
            to,
            revoked_children,
        })
    })
}

/// Adds one parent subscription.
pub fn add_parent<S: Store + ?Sized>(
    store: &S,
    parent: &NewParent,
    actor: &str,
    now: Timestamp,
) -> Result<(), StoreError> {
    let policy = parent.policy.clone().validated()?;
    transact(store, |tx| {
        let p = NewParent {
            policy: policy.clone(),
            ..parent.clone()
        };
        tx.insert_parent(&p, now)?;
        tx.append_audit(&AuditEvent {
            at: now,
            actor: actor.to_owned(),
            action: AuditAction::Add,
            supi: p.supi.clone(),
            parent: None,
            device_id: None,
            request_id: None,
            detail: String::new(),
        })
    })
}

/// Replaces a parent's policy. Existing children keep their restrictions until they are renewed
/// (then re-narrowed) and count against the new quota.
pub fn set_parent_policy<S: Store + ?Sized>(
    store: &S,
    supi: &Supi,
    policy: &ParentPolicy,
    actor: &str,
    now: Timestamp,
) -> Result<(), StoreError> {
    let policy = policy.clone().validated()?;
    transact(store, |tx| {
        tx.lock_parent(supi)?
            .ok_or_else(|| StoreError::ParentNotFound(supi.clone()))?;
        tx.set_parent_policy(supi, &policy, now)?;
        tx.append_audit(&AuditEvent {
            at: now,
            actor: actor.to_owned(),
            action: AuditAction::Policy,
            supi: supi.clone(),
            parent: None,
            device_id: None,
            request_id: None,
            detail: format!(
                "max_children={} max_lifetime_s={} roaming={} dnns={} max_bitrate_kbps={}",
                policy.max_children,
                policy.max_lifetime_s,
                policy.roaming_allowed,
                policy
                    .allowed_dnns
                    .iter()
                    .map(|d| d.as_str())
                    .collect::<Vec<_>>()
                    .join(";"),
                policy
                    .max_bitrate_kbps
                    .map_or_else(|| "none".to_owned(), |b| b.to_string()),
            ),
        })
    })
}
