//! End-to-end tests live in `tests/`; they drive the real images with the
//! `docker` CLI (and later `kubectl`), as users do. Prepare the images with
//! `scripts/build-images.sh` and the virthost with `scripts/virthost-up.sh`
//! (scripts/test.sh does both).
