//! Typed identifiers. Each id is a newtype so that a run id can never be passed where a task id
//! is expected. All of them convert to and from their PostgreSQL column types.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::{Error, Result};

/// Longest accepted text id (instance ids, tenant ids, names), in bytes.
pub const MAX_TEXT_ID_LEN: usize = 128;

/// Validate a text identifier: non-empty, at most [`MAX_TEXT_ID_LEN`] bytes, no control
/// characters. Any other unicode (including SQL metacharacters) is accepted: every query binds
/// parameters, nothing is interpolated.
pub fn validate_text_id(field: &'static str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid(field, "must not be empty"));
    }
    if value.len() > MAX_TEXT_ID_LEN {
        return Err(Error::invalid(
            field,
            format!(
                "is {} bytes long; at most {MAX_TEXT_ID_LEN} are allowed",
                value.len()
            ),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// The PostgreSQL side of an id newtype around `$inner` (see `sql_value!`): rows were validated
/// on the way in, so any value of the listed types is accepted.
macro_rules! sql_newtype {
    ($name:ident, $inner:ty, [$($accepts:ident),+], $sql:ident, $array:ident) => {
        sql_value!($name as $inner, [$($accepts),+], $sql, $array,
                   to: |s| s.0, from: |v| Ok(Self(v)));
    };
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new random (v4) id.
            pub fn new() -> Self {
                Self(Uuid::new_v4())
            }
            /// The underlying UUID.
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Uuid::parse_str(s.trim())
                    .map(Self)
                    .map_err(|e| Error::invalid($kind, format!("`{s}` is not a UUID: {e}")))
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }

        sql_newtype!($name, Uuid, [UUID], UUID, UUID_ARRAY);
    };
}

macro_rules! text_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validate and wrap an id (non-empty, at most 128 bytes, no control characters).
            pub fn new(value: impl Into<String>) -> Result<Self> {
                let value = value.into();
                validate_text_id($kind, &value)?;
                Ok(Self(value))
            }
            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = Error;
            fn try_from(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }

        // Rows were validated on the way in; accept what the database holds.
        sql_newtype!($name, String, [TEXT, VARCHAR], TEXT, TEXT_ARRAY);
    };
}

text_id!(
    /// Identifies an instance (a process linking pgcrew). Given by the user or a random UUID.
    InstanceId,
    "instance id"
);
text_id!(
    /// Identifies a tenant.
    TenantId,
    "tenant id"
);

impl InstanceId {
    /// A random UUID-based instance id.
    pub fn random() -> Self {
        Self(Uuid::new_v4().to_string())
    }
}

uuid_id!(
    /// Identifies a run.
    RunId,
    "run id"
);
uuid_id!(
    /// Identifies a session (a tenant's conversation or job grouping runs).
    SessionId,
    "session id"
);
uuid_id!(
    /// Identifies a worker pool of one instance: its rows in `pgcrew.queue_waiters` and the
    /// wake-ups that name it (on its instance's `pgcrew_wake_…` channel, see
    /// [`wake_channel`](crate::coord::notify::wake_channel)).
    PoolId,
    "pool id"
);
uuid_id!(
    /// A task claim token: proves that an acknowledgement comes from the current claim.
    ClaimToken,
    "claim token"
);

/// Identifies a task (`pgcrew.tasks.id`, a bigserial).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskId(pub i64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TaskId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        s.trim()
            .parse::<i64>()
            .ok()
            .filter(|v| *v > 0)
            .map(TaskId)
            .ok_or_else(|| Error::invalid("task id", format!("`{s}` is not a positive integer")))
    }
}

sql_newtype!(TaskId, i64, [INT8], INT8, INT8_ARRAY);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_ids_are_validated() {
        assert!(TenantId::new("").is_err());
        assert!(TenantId::new("a".repeat(129)).is_err());
        assert!(TenantId::new("bad\nid").is_err());
        assert_eq!(
            TenantId::new("acme'; DROP TABLE x; --ü")
                .map(|t| t.to_string())
                .ok(),
            Some("acme'; DROP TABLE x; --ü".to_string())
        );
    }

    #[test]
    fn ids_accept_the_same_sql_types() {
        use postgres_types::{FromSql, ToSql, Type};
        fn both<T: ToSql + for<'a> FromSql<'a>>(ty: &Type) -> (bool, bool) {
            (<T as ToSql>::accepts(ty), <T as FromSql>::accepts(ty))
        }
        assert_eq!(both::<RunId>(&Type::UUID), (true, true));
        assert_eq!(both::<ClaimToken>(&Type::TEXT), (false, false));
        for ty in [Type::TEXT, Type::VARCHAR] {
            assert_eq!(both::<TenantId>(&ty), (true, true), "{ty}");
            assert_eq!(both::<InstanceId>(&ty), (true, true), "{ty}");
        }
        for ty in [Type::BPCHAR, Type::NAME, Type::UUID] {
            assert_eq!(both::<TenantId>(&ty), (false, false), "{ty}");
        }
        assert_eq!(both::<TaskId>(&Type::INT8), (true, true));
        assert_eq!(both::<TaskId>(&Type::INT4), (false, false));
    }

    #[test]
    fn text_ids_compare_with_strings() {
        let t = TenantId::new("acme").unwrap();
        let owned = String::from("acme");
        assert!(t == "acme" && t == *"acme" && t == owned);
        assert!("acme" == t && *"acme" == t && owned == t);
        assert!(t != "acme2" && "other" != t);
        assert_eq!(t, "acme");
        let i = InstanceId::new("worker-1").unwrap();
        assert_eq!(i, "worker-1");
        assert_ne!(i, "worker-2");
    }

    #[test]
    fn uuid_and_task_ids_parse() {
        assert!("not-a-uuid".parse::<RunId>().is_err());
        let r = RunId::new();
        assert_eq!(r.to_string().parse::<RunId>().ok(), Some(r));
        assert!("0".parse::<TaskId>().is_err());
        assert_eq!("42".parse::<TaskId>().ok(), Some(TaskId(42)));
    }
}
