//! Who may do what: the rules every RPC applies, in one place (SPEC §2.3 for who is acting).
//!
//! - A caller acts as the request's own user field, else as `context.actor`; it may act for,
//!   or read the view of, another user only when privileged (a service, tenant administrator
//!   or the system acting for users).
//! - A message concerns its sender and the receivers it names (everyone in its session when it
//!   names none): only they may hide it for themselves or mark it read; to anyone else it is
//!   not found.
//! - Deleting for everyone and changing attributes: the sender, or a privileged actor.
//!   Recalling: the sender alone.

use flare_storage_common::proto::common::ActorType;

use crate::error::Error;
use crate::store::rows::TargetRow;

/// Who is acting, and whether on behalf of users (a service, tenant administrator or the
/// system).
#[derive(Debug, Clone, Copy)]
pub struct Actor<'a> {
    pub id: &'a str,
    pub privileged: bool,
}

/// Whether an actor type acts on behalf of users.
pub fn privileged(kind: ActorType) -> bool {
    matches!(kind, ActorType::Service | ActorType::TenantAdmin | ActorType::System)
}

/// Whether `caller` may act for `user`: themselves, or privileged.
pub fn may_act_for(caller: Actor<'_>, user: &str) -> Result<(), Error> {
    if caller.id != user && !caller.privileged {
        return Err(Error::PermissionDenied("context.actor may not act for another user"));
    }
    Ok(())
}

/// Whether `caller` may read what `user` sees (what they hid or cleared): themselves, or
/// privileged.
pub fn may_read_view_of(caller: Actor<'_>, user: &str) -> Result<(), Error> {
    if caller.id != user && !caller.privileged {
        return Err(Error::PermissionDenied("context.actor may not read another user's view"));
    }
    Ok(())
}

/// A change to a message for everyone.
#[derive(Debug, Clone, Copy)]
pub enum Change {
    DeleteForEveryone,
    Recall,
    Attributes,
}

/// Whether `actor` may make `change` to `target`.
pub fn may_change(actor: Actor<'_>, target: &TargetRow, change: Change) -> Result<(), Error> {
    let (sender_only, refusal) = match change {
        Change::DeleteForEveryone => (false, "only the sender may delete a message for everyone"),
        Change::Recall => (true, "only the sender may recall a message"),
        Change::Attributes => (false, "only the sender may change a message's attributes"),
    };
    if target.sender_id == actor.id || (actor.privileged && !sender_only) {
        return Ok(());
    }
    Err(Error::PermissionDenied(refusal))
}

/// Whether a message concerns `user_id`: its sender, a receiver it names, or anyone when it
/// names none.
pub fn concerns(target: &TargetRow, user_id: &str) -> bool {
    let names_receivers = !target.receiver_id.is_empty() || !target.receiver_ids.is_empty();
    target.sender_id == user_id
        || !names_receivers
        || target.receiver_id == user_id
        || target.receiver_ids.iter().any(|receiver| receiver == user_id)
}
