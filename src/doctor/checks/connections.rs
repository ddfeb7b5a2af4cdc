//! Connection checks: TLS of pgcrew's connections.

use super::{Backend, Ctx};
use crate::doctor::{CheckId, Finding};
use crate::error::Result;

pub(super) async fn tls(ctx: &mut Ctx<'_>) -> Result<Finding> {
    let check = CheckId::Tls;
    let own = ctx.client.query_opt(sql!("doctor/own_tls"), &[]).await?;
    let own_text = match own {
        Some(r) if r.try_get::<_, bool>("unix_socket")? => "a unix socket".to_string(),
        Some(r) if r.try_get::<_, Option<bool>>("ssl")? == Some(true) => format!(
            "TLS ({})",
            r.try_get::<_, Option<String>>("version")?
                .unwrap_or_else(|| "?".into())
        ),
        Some(_) => "no TLS".to_string(),
        None => "unknown".to_string(),
    };
    let prefix = ctx.opts.application_name_prefix.clone();
    let max_items = ctx.opts.max_items;
    let backends = ctx.backends().await?;
    let pgcrew: Vec<&Backend> = backends.iter().filter(|b| b.is_pgcrew(&prefix)).collect();
    let advice_plain = "connect every instance with TLS: `sslmode=verify-full` (with \
                        `sslrootcert=<CA file>` or `system`) in its DSN (DATABASE_URL) and in \
                        listen_dsn; turn `ssl = on` on with a server certificate; then make \
                        pg_hba.conf accept pgcrew's role over `hostssl` lines only. Instances \
                        on the database host may use a unix socket instead";
    if pgcrew.is_empty() {
        return Ok(Finding::warn(
            check,
            format!(
                "no pgcrew connection to this database is open (application_name `{prefix}...`), \
                 so none could be checked (this doctor's connection: {own_text})"
            ),
            "run the doctor while the instances run; if they connect with another \
             application_name, pass it (--application-name-prefix)",
        ));
    }
    let plain: Vec<&&Backend> = pgcrew
        .iter()
        .filter(|b| !b.hidden && !b.unix_socket() && b.ssl != Some(true))
        .collect();
    let hidden: Vec<&&Backend> = pgcrew.iter().filter(|b| b.hidden).collect();
    let unix = pgcrew.iter().filter(|b| b.unix_socket()).count();
    let tls: Vec<&&Backend> = pgcrew.iter().filter(|b| b.ssl == Some(true)).collect();
    let mut versions: Vec<String> = tls.iter().filter_map(|b| b.tls_version.clone()).collect();
    versions.sort();
    versions.dedup();
    let unix_text = if unix > 0 {
        format!("; {unix} over a unix socket, where TLS does not apply")
    } else {
        String::new()
    };
    if !plain.is_empty() {
        return Ok(Finding::fail(
            check,
            format!(
                "{} of {} pgcrew connection(s) do not use TLS{unix_text} (this doctor's \
                 connection: {own_text})",
                plain.len(),
                pgcrew.len()
            ),
            advice_plain,
        )
        .items(plain.iter().map(|b| b.describe()).collect(), max_items));
    }
    if !hidden.is_empty() {
        return Ok(Finding::warn(
            check,
            format!(
                "{} of {} pgcrew connection(s) belong to other roles, whose TLS state this role \
                 cannot see; the {} visible use TLS{unix_text}",
                hidden.len(),
                pgcrew.len(),
                pgcrew.len() - hidden.len()
            ),
            "run the doctor as a superuser or a member of pg_read_all_stats \
             (`GRANT pg_read_all_stats TO <doctor role>`)",
        )
        .items(hidden.iter().map(|b| b.describe()).collect(), max_items));
    }
    Ok(Finding::pass(
        check,
        format!(
            "{} pgcrew connection(s): {} use TLS{}{unix_text} (this doctor's connection: \
             {own_text})",
            pgcrew.len(),
            tls.len(),
            if versions.is_empty() {
                String::new()
            } else {
                format!(" ({})", versions.join(", "))
            }
        ),
    ))
}
