SELECT valid, first_bad_seq, checked, problem FROM pgcrew.verify_run_chain($1::uuid)
