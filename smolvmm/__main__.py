from smolvmm.cli import main

raise SystemExit(main())
