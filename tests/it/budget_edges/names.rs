//! Non-ASCII model names never panic.

use super::*;

#[test]
fn non_ascii_model_names_never_panic_in_price_lookup() {
    let mut table = PriceTable::builtin();
    table.set("modèle", 1.0, 2.0).unwrap();
    table.set("模型", 1.0, 2.0).unwrap();
    for name in [
        "modèle-2024-08",
        "modèle-2024-08-06",
        "模型-2024-08-06",
        "模型-2024-0８-06",
        "gpt-4o-mini-２０２４-０７-１８",
        "🤖🤖🤖🤖🤖🤖🤖🤖",
        "é-2024-08-0",
        "ü1234567890",
        "modèle",
    ] {
        let r = std::panic::catch_unwind(|| table.get(name));
        assert!(r.is_ok(), "PriceTable::get({name:?}) panicked");
    }
    assert_eq!(
        table.get("modèle-2024-08-06").unwrap().prompt_per_million,
        1.0
    );
    assert_eq!(
        table.get("模型-2024-08-06").unwrap().prompt_per_million,
        1.0
    );
    assert!(matches!(
        table.get("modèle-2024-08"),
        Err(Error::UnknownModelPrice(_))
    ));
    // Random Unicode strings (including dated-looking tails) never panic.
    let mut rng = fastrand::Rng::with_seed(3);
    for _ in 0..20_000 {
        let len = rng.usize(0..24);
        let mut s: String = (0..len)
            .map(|_| match rng.u8(..4) {
                0 => rng.char('0'..='9'),
                1 => '-',
                2 => rng.char('a'..='z'),
                _ => rng.char(..),
            })
            .collect();
        if rng.bool() {
            s.push_str("-2024-08-06");
        }
        let r = std::panic::catch_unwind(|| table.get(&s));
        assert!(r.is_ok(), "PriceTable::get({s:?}) panicked");
    }
}

#[tokio::test]
async fn agent_with_a_non_ascii_model_name_fails_cleanly() {
    let (t, acme) = db_with_tenant("acme", &[], Some(1.0)).await;
    let model = Arc::new(ScriptedModel::by_turn(vec![ScriptedReply::text("bonjour")]));
    let rt = AgentRuntime::new(Kernel::new(t.db.clone(), model.clone()), "i1");
    let session = rt.new_session(&acme, "s").await.unwrap();
    for (i, name) in ["modèle-2024-08", "模型-2024-08-06", "🤖-2024-08-0"]
        .iter()
        .enumerate()
    {
        let agent = format!("a{i}");
        register_agent(&t.db, &AgentDef::new(agent.clone(), *name))
            .await
            .unwrap();
        let run = rt.submit(&agent, session.id, "bonjour").await.unwrap();
        let handle = tokio::spawn({
            let rt = rt.clone();
            async move { rt.execute(run, None).await }
        });
        let r = handle
            .await
            .unwrap_or_else(|e| panic!("{name}: the agent run panicked: {e}"))
            .unwrap();
        assert_eq!(r.state, RunState::Failed, "{name}");
        assert_eq!(
            r.error_type.as_deref(),
            Some("unknown_model_price"),
            "{name}"
        );
    }
    assert_eq!(model.calls(), 0);
}
