from visionzoo.cli import main

raise SystemExit(main())
