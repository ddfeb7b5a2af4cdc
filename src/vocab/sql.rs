//! The vocabulary as SQL values: the text-stored types (`TaskState`, `RunState`,
//! `BudgetStatus`, `EventType`) are `text`, [`Priority`] its stored number (`int2`). Reading a
//! value that is not one of the type's is an error naming it, never a panic.

use super::{BudgetStatus, EventType, Priority, RunState, TaskState};

/// The PostgreSQL side of text-stored vocabulary types (see `sql_value!`): `text`, accepting
/// exactly `text` and `varchar` like the text ids. Reading a name that is not one of the type's
/// values is an error naming it.
macro_rules! sql_text_vocab {
    ($($name:ident),+ $(,)?) => {$(
        sql_value!($name as &str, [TEXT, VARCHAR], TEXT, TEXT_ARRAY,
            to: |s| s.as_str(),
            from: |name| $name::from_name(name).ok_or_else(|| {
                format!(concat!("`{}` is not a known ", stringify!($name)), name).into()
            }));
    )+};
}

sql_text_vocab!(TaskState, RunState, BudgetStatus, EventType);

// Priority is stored as its number (`pgcrew.tasks.priority smallint`), so it is `int2` in SQL.
sql_value!(Priority as i16, [INT2], INT2, INT2_ARRAY,
    to: |s| s.as_i16(),
    from: |v| Priority::from_i16(v).ok_or_else(|| format!("`{v}` is not a known Priority (0..=4)").into()));

#[cfg(test)]
mod tests {
    use super::*;

    fn sql_round_trip<T>(value: T, ty: &postgres_types::Type) -> Option<T>
    where
        T: postgres_types::ToSql + for<'a> postgres_types::FromSql<'a>,
    {
        let mut buf = postgres_types::private::BytesMut::new();
        value.to_sql_checked(ty, &mut buf).ok()?;
        T::from_sql(ty, &buf).ok()
    }

    #[test]
    fn sql_values_round_trip_and_accept_only_their_column_types() {
        use postgres_types::{FromSql, ToSql, Type};
        fn both<T: ToSql + for<'a> FromSql<'a>>(ty: &Type) -> (bool, bool) {
            (<T as ToSql>::accepts(ty), <T as FromSql>::accepts(ty))
        }
        for ty in [Type::TEXT, Type::VARCHAR] {
            for s in TaskState::ALL {
                assert_eq!(sql_round_trip(s, &ty), Some(s), "{s} as {ty}");
            }
            for s in RunState::ALL {
                assert_eq!(sql_round_trip(s, &ty), Some(s), "{s} as {ty}");
            }
            for s in BudgetStatus::ALL {
                assert_eq!(sql_round_trip(s, &ty), Some(s), "{s} as {ty}");
            }
            for e in EventType::ALL {
                assert_eq!(sql_round_trip(e, &ty), Some(e), "{e} as {ty}");
            }
            assert_eq!(both::<TaskState>(&ty), (true, true));
            assert_eq!(both::<EventType>(&ty), (true, true));
        }
        for ty in [Type::BPCHAR, Type::NAME, Type::INT2] {
            assert_eq!(both::<TaskState>(&ty), (false, false), "{ty}");
            assert_eq!(both::<RunState>(&ty), (false, false), "{ty}");
            assert_eq!(both::<BudgetStatus>(&ty), (false, false), "{ty}");
            assert_eq!(both::<EventType>(&ty), (false, false), "{ty}");
        }
        for p in Priority::ALL {
            assert_eq!(sql_round_trip(p, &Type::INT2), Some(p));
        }
        assert_eq!(both::<Priority>(&Type::INT2), (true, true));
        assert_eq!(both::<Priority>(&Type::TEXT), (false, false));
        assert_eq!(both::<Priority>(&Type::INT4), (false, false));
        let mut buf = postgres_types::private::BytesMut::new();
        assert!(Priority::Low.to_sql_checked(&Type::TEXT, &mut buf).is_err());
    }

    #[test]
    fn unknown_sql_values_are_errors_naming_the_value() {
        use postgres_types::{FromSql, Type};
        let err = |r: Result<(), Box<dyn std::error::Error + Sync + Send>>| {
            r.err().map(|e| e.to_string()).unwrap_or_default()
        };
        assert_eq!(
            err(TaskState::from_sql(&Type::TEXT, b"finished").map(drop)),
            "`finished` is not a known TaskState"
        );
        assert_eq!(
            err(RunState::from_sql(&Type::TEXT, b"Running").map(drop)),
            "`Running` is not a known RunState"
        );
        assert_eq!(
            err(BudgetStatus::from_sql(&Type::VARCHAR, b"healthy").map(drop)),
            "`healthy` is not a known BudgetStatus"
        );
        assert_eq!(
            err(EventType::from_sql(&Type::TEXT, b"my_custom_event").map(drop)),
            "`my_custom_event` is not a known EventType"
        );
        assert_eq!(
            err(Priority::from_sql(&Type::INT2, &7i16.to_be_bytes()).map(drop)),
            "`7` is not a known Priority (0..=4)"
        );
        assert_eq!(
            err(Priority::from_sql(&Type::INT2, &(-1i16).to_be_bytes()).map(drop)),
            "`-1` is not a known Priority (0..=4)"
        );
    }
}
