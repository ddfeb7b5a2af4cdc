//! Retrying a dependant: it waits for its parent again.

use super::*;

#[tokio::test]
async fn retried_dependant_waits_for_its_parent() {
    let (t, me, conn) = db_with_instance_conn("deps").await;
    let parent = enqueued(&conn, &task("k").queue("dq")).await.id;
    let child = enqueued(&conn, &task("k").queue("dq").depends_on([parent])).await;
    assert_eq!(child.state, TaskState::Scheduled);
    let child = child.id;
    assert_eq!(cancel_task(&t, child).await, TaskState::Cancelled);
    // Retried while the parent has not run: the child waits for it.
    assert_eq!(retry_task(&t, child).await, TaskState::Scheduled);
    let c = queue::claim(&conn, &qs(&["dq"]), 10, &me).await.unwrap();
    assert_eq!(
        c.iter().map(|x| x.id).collect::<Vec<_>>(),
        vec![parent],
        "the child ran before its parent"
    );
    queue::ack(&conn, &[c[0].ack(AckOutcome::Complete)])
        .await
        .unwrap();
    let c = queue::claim(&conn, &qs(&["dq"]), 10, &me).await.unwrap();
    assert_eq!(c.iter().map(|x| x.id).collect::<Vec<_>>(), vec![child]);
    queue::ack(&conn, &[c[0].ack(AckOutcome::Complete)])
        .await
        .unwrap();
    // Retried after the parent completed: available at once.
    assert_eq!(retry_task(&t, child).await, TaskState::Available);

    // A parent that was cancelled will never complete: retrying its dependant is refused
    // with a pointer to the parent, and nothing changes.
    let p2 = enqueued(&conn, &task("k").queue("dq2")).await.id;
    let c2 = enqueued(&conn, &task("k").queue("dq2").depends_on([p2]))
        .await
        .id;
    queue::cancel(&conn, p2).await.unwrap();
    assert_eq!(
        queue::get(&conn, c2).await.unwrap().state,
        TaskState::Cancelled
    );
    let err = queue::retry(&conn, c2).await.unwrap_err();
    assert!(
        matches!(err, Error::InvalidInput { field: "task", .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&p2.to_string()), "{err}");
    assert_eq!(
        queue::get(&conn, c2).await.unwrap().state,
        TaskState::Cancelled
    );
    // Retry the parent first, then the child: it waits for the parent again.
    assert_eq!(retry_task(&t, p2).await, TaskState::Available);
    assert_eq!(retry_task(&t, c2).await, TaskState::Scheduled);
}
