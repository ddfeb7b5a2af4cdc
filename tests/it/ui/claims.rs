//! A task's claim history on its page: every attempt that did not succeed names the instance
//! that held its claim (V037: failed by an acknowledgement, rescued from a stopped instance),
//! then the last claim.

use pgcrew::ui::UiConfig;

use super::{console, get_html, get_json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_task_page_lists_each_attempts_instance_and_the_last_claim() {
    let c = console("ui-claims", UiConfig::new()).await;
    let conn = c.client.db().get().await.unwrap();
    let id: i64 = conn
        .query_one(
            "INSERT INTO pgcrew.tasks (queue, kind, tenant_id, state, max_attempts)
             VALUES ('claims', 'job', 'default', 'available', 5) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // Attempt 1 on instance-a fails by its acknowledgement.
    let token: uuid::Uuid = conn
        .query_one(
            "SELECT claim_token FROM pgcrew.claim_tasks(ARRAY['claims'], 1, 'instance-a')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    conn.execute(
        "SELECT pgcrew.ack_tasks(ARRAY[$1::bigint], ARRAY[$2::uuid], ARRAY['fail'], ARRAY[0::bigint], ARRAY['boom'])",
        &[&id, &token],
    )
    .await
    .unwrap();
    // Attempt 2 on instance-b, which is not registered: the rescue takes the task back.
    conn.execute(
        "SELECT pgcrew.claim_tasks(ARRAY['claims'], 1, 'instance-b')",
        &[],
    )
    .await
    .unwrap();
    let rescued: i64 = conn
        .query_one(
            "SELECT count(*) FROM pgcrew.rescue_tasks(60000000, 10)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(rescued, 1);
    // Attempt 3 runs on instance-c.
    conn.execute(
        "SELECT pgcrew.claim_tasks(ARRAY['claims'], 1, 'instance-c')",
        &[],
    )
    .await
    .unwrap();

    let (status, d) = get_json(&c.url(&format!("/api/tasks/{id}"))).await;
    assert_eq!(status, 200, "{d}");
    let errors = d["task"]["errors"].as_array().expect("errors").clone();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0]["attempt"], 1);
    assert_eq!(errors[0]["instance"], "instance-a");
    assert_eq!(errors[0]["error"], "boom");
    assert_eq!(errors[1]["attempt"], 2);
    assert_eq!(errors[1]["instance"], "instance-b");
    assert!(
        errors[1]["error"].as_str().unwrap().starts_with("rescued"),
        "{errors:?}"
    );
    assert_eq!(d["task"]["claimed_by"], "instance-c");
    assert_eq!(d["task"]["attempts"], 3);

    let (status, html) = get_html(&c.url(&format!("/tasks/{id}"))).await;
    assert_eq!(status, 200);
    for want in [
        r#"<td class="instance">instance-a</td>"#,
        r#"<td class="instance">instance-b</td>"#,
        r#"<tr id="last-claim"><td>3</td><td class="instance">instance-c</td>"#,
    ] {
        assert!(html.contains(want), "{want} not in the task page:\n{html}");
    }
}
