from data_prep.prepare import main

raise SystemExit(main())
