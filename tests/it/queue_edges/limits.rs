//! Concurrency limits under multi-queue claims: tenant and tenant-queue limits hold, also for
//! random queues and limits with concurrent claimers.

use super::*;

#[tokio::test]
async fn multi_queue_claims_hold_tenant_and_queue_limits() {
    let (t, me) = db_with_instance("w1").await;
    let one = create_tenant(&t, "one", Some(1)).await;
    let conn = t.db.get().await.unwrap();
    for q in ["qa", "qb"] {
        queue::enqueue(&conn, &task("k").tenant(one.clone()).queue(q))
            .await
            .unwrap();
    }
    let rows = conn
        .query(
            "SELECT id FROM pgcrew.claim_tasks(ARRAY['qa', 'qb'], 10, 'w1')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        rows.len(),
        1,
        "tenant limited to 1 got {} tasks",
        rows.len()
    );
    assert!(
        queue::claim(&conn, &qs(&["qa", "qb"]), 10, &me)
            .await
            .unwrap()
            .is_empty()
    );
    // A per-queue limit, with the queue named twice.
    let narrow = create_tenant(&t, "narrow", None).await;
    queue::set_queue_limit(&conn, &narrow, "qn", 1)
        .await
        .unwrap();
    for _ in 0..3 {
        queue::enqueue(&conn, &task("k").tenant(narrow.clone()).queue("qn"))
            .await
            .unwrap();
    }
    let c = queue::claim(&conn, &qs(&["qn", "qb", "qn"]), 10, &me)
        .await
        .unwrap();
    assert_eq!(c.len(), 1, "queue limited to 1 got {}", c.len());
}

/// Random queues, tenant and tenant-queue limits, and concurrent claimers on their own
/// connections (single-queue ones take the fast path, multi-queue ones pgcrew.claim_tasks):
/// neither a continuous sampler of the database nor the claimers' own books ever see a limit
/// exceeded.
#[tokio::test]
async fn limits_hold_for_random_queues_limits_and_concurrent_claimers() {
    for seed in [11u64, 22, 33] {
        limit_property(seed).await;
    }
}

/// Tasks the claimers hold, per tenant (queue `None`) and per tenant and queue.
type Books = HashMap<(String, Option<String>), i64>;

async fn limit_property(seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let (t, me) = db_with_instance("prop").await;
    let queues = ["qa", "qb", "qc"];
    let mut tenant_limits: HashMap<String, i64> = HashMap::new();
    let mut queue_limits: HashMap<(String, String), i64> = HashMap::new();
    let mut tenants = Vec::new();
    let conn = t.db.get().await.unwrap();
    for i in 0..4 {
        let name = format!("t{i}");
        // t0 is always limited to 1; the others at random (or not at all).
        let limit = if i == 0 {
            Some(1)
        } else {
            match rng.u32(0..4) {
                0 => None,
                n => Some(n as i32),
            }
        };
        let tn = create_tenant(&t, &name, limit).await;
        if let Some(l) = limit {
            tenant_limits.insert(name.clone(), l as i64);
        }
        for q in queues {
            if rng.u32(0..3) == 0 {
                let l = rng.i32(1..3);
                queue::set_queue_limit(&conn, &tn, q, l).await.unwrap();
                queue_limits.insert((name.clone(), q.to_string()), l as i64);
            }
        }
        tenants.push(tn);
    }
    let tasks: Vec<NewTask> = (0..400)
        .map(|_| {
            task("k")
                .tenant(tenants[rng.usize(0..tenants.len())].clone())
                .queue(queues[rng.usize(0..queues.len())])
        })
        .collect();
    queue::enqueue_many(&conn, &tasks).await.unwrap();

    let books: Arc<Mutex<Books>> = Arc::default();
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for c in 0..8 {
        // A random ordered subset of the queues, sometimes with a queue named twice.
        let mut mine: Vec<String> = queues
            .iter()
            .filter(|_| rng.bool())
            .map(|s| s.to_string())
            .collect();
        if mine.is_empty() || c < 2 {
            mine = queues.iter().map(|s| s.to_string()).collect();
        }
        rng.shuffle(&mut mine);
        if rng.u32(0..4) == 0 {
            mine.push(mine[0].clone());
        }
        let claim_n = rng.i32(1..5);
        let hold_ms = rng.u64(0..3);
        let (db, me, books, violations) =
            (t.db.clone(), me.clone(), books.clone(), violations.clone());
        let (tenant_limits, queue_limits) = (tenant_limits.clone(), queue_limits.clone());
        handles.push(tokio::spawn(async move {
            let conn = db.get().await.unwrap();
            let mut idle = 0;
            while idle < 30 {
                let got = queue::claim(&conn, &mine, claim_n, &me).await.unwrap();
                if got.is_empty() {
                    idle += 1;
                    tokio::time::sleep(Duration::from_millis(3)).await;
                    continue;
                }
                idle = 0;
                {
                    let mut b = books.lock().unwrap();
                    for x in &got {
                        for key in [
                            (x.tenant.to_string(), None),
                            (x.tenant.to_string(), Some(x.queue.clone())),
                        ] {
                            let n = b.entry(key.clone()).or_default();
                            *n += 1;
                            let limit = match &key.1 {
                                None => tenant_limits.get(&key.0),
                                Some(q) => queue_limits.get(&(key.0.clone(), q.clone())),
                            };
                            if let Some(l) = limit
                                && *n > *l
                            {
                                violations
                                    .lock()
                                    .unwrap()
                                    .push(format!("claimers held {n} of {key:?} (limit {l})"));
                            }
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(hold_ms)).await;
                {
                    let mut b = books.lock().unwrap();
                    for x in &got {
                        *b.entry((x.tenant.to_string(), None)).or_default() -= 1;
                        *b.entry((x.tenant.to_string(), Some(x.queue.clone())))
                            .or_default() -= 1;
                    }
                }
                let acks: Vec<Ack> = got.iter().map(|x| x.ack(AckOutcome::Complete)).collect();
                queue::ack(&conn, &acks).await.unwrap();
            }
        }));
    }
    let sampler = {
        let (db, done) = (t.db.clone(), done.clone());
        tokio::spawn(async move {
            let conn = db.get().await.unwrap();
            let (mut over, mut at_limit, mut samples) = (Vec::new(), 0i64, 0u64);
            while !done.load(Ordering::SeqCst) {
                // One statement: one snapshot of every running count against its limit.
                let rows = conn
                    .query(
                        "WITH r AS (SELECT tenant_id, queue, count(*) AS n FROM pgcrew.tasks
                                     WHERE state = 'running' GROUP BY tenant_id, queue),
                              c AS (SELECT r.tenant_id, NULL::text AS queue, sum(r.n)::bigint AS n,
                                           tn.max_concurrent_tasks::bigint AS lim
                                      FROM r JOIN pgcrew.tenants tn ON tn.id = r.tenant_id
                                     WHERE tn.max_concurrent_tasks IS NOT NULL
                                     GROUP BY r.tenant_id, tn.max_concurrent_tasks
                                    UNION ALL
                                    SELECT r.tenant_id, r.queue, r.n, l.max_concurrent_tasks::bigint
                                      FROM r JOIN pgcrew.tenant_queue_limits l
                                        ON l.tenant_id = r.tenant_id AND l.queue = r.queue)
                         SELECT tenant_id, queue, n, lim FROM c WHERE n >= lim",
                        &[],
                    )
                    .await
                    .unwrap();
                for r in &rows {
                    let (n, lim): (i64, i64) = (r.get(2), r.get(3));
                    if n > lim {
                        over.push(format!(
                            "database: {n} running for {}/{:?} (limit {lim})",
                            r.get::<_, String>(0),
                            r.get::<_, Option<String>>(1)
                        ));
                    } else {
                        at_limit += 1;
                    }
                }
                samples += 1;
            }
            (over, at_limit, samples)
        })
    };
    for h in handles {
        h.await.unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let (over, at_limit, samples) = sampler.await.unwrap();
    let local = violations.lock().unwrap().clone();
    assert!(
        over.is_empty() && local.is_empty(),
        "seed {seed}: limits exceeded: {:?} {:?}",
        &over[..over.len().min(5)],
        &local[..local.len().min(5)]
    );
    assert!(samples > 20, "seed {seed}: only {samples} samples");
    assert!(
        at_limit > 0,
        "seed {seed}: no limit was ever reached: the test did not exercise them"
    );
    assert_eq!(
        scalar(&t, OPEN_TASKS).await,
        0,
        "seed {seed}: tasks left over"
    );
}
