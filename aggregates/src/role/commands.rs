//! Commands of the Role aggregate. Facts about other roles (the parent's ancestry) and about
//! the caller (what it may grant) are looked up by the service layer and handed in.

use serde::Deserialize;
use uuid::Uuid;

use crate::PermissionSet;

#[derive(Debug, Clone, Deserialize)]
pub enum RoleCommand {
    Create {
        role_id: Uuid,
        organization_id: Uuid,
        name: String,
        description: String,
        permissions: PermissionSet,
        parent_role_id: Option<Uuid>,
        /// The parent and its ancestors, nearest first, walked to one past
        /// [`MAX_INHERITANCE_DEPTH`](super::MAX_INHERITANCE_DEPTH) at most; empty without a
        /// parent.
        parent_ancestry: Vec<Uuid>,
        /// Set only by organization creation.
        built_in: bool,
        /// The effective permissions of the caller; the role may not exceed them.
        grantable: PermissionSet,
    },
    /// `None` leaves a field as it is; `parent_role_id: Some(None)` removes the parent.
    Update {
        name: Option<String>,
        description: Option<String>,
        permissions: Option<PermissionSet>,
        parent_role_id: Option<Option<Uuid>>,
        /// The new parent and its ancestors, nearest first, walked to one past
        /// [`MAX_INHERITANCE_DEPTH`](super::MAX_INHERITANCE_DEPTH) at most; the role must not
        /// be among them.
        parent_ancestry: Vec<Uuid>,
        /// How many levels of roles inherit from this one (0: none), counted to one past the
        /// limit at most: with a new parent each of them gains its ancestors too.
        inheriting_levels: usize,
        grantable: PermissionSet,
    },
    Delete,
}
