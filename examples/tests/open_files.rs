//! Local mode raises its soft limit on open files to the hard limit. In a test binary of its own: it changes the
//! whole process's limit.

use rlimit::Resource;
use rootscale_examples::local::open_files::raise_limit;

#[test]
fn a_low_soft_limit_is_raised_to_the_hard_one() {
    let (_, hard) = Resource::NOFILE.get().unwrap();
    // As a shell's default leaves it (1,024 is common), lower still so the raise is seen whatever the hard limit.
    let low = hard.min(256);
    Resource::NOFILE.set(low, hard).unwrap();
    assert_eq!(Resource::NOFILE.get().unwrap().0, low);
    let limit = raise_limit().expect("the limit could be read");
    let (soft, hard_after) = Resource::NOFILE.get().unwrap();
    assert_eq!(hard_after, hard, "the hard limit is not touched");
    assert_eq!(soft, limit, "the limit returned is the one in force");
    // Linux raises to the hard limit; macOS caps it at OPEN_MAX, still above the low one here.
    assert!(soft > low || hard == low, "the soft limit stayed at {soft}");
    if cfg!(target_os = "linux") {
        assert_eq!(soft, hard);
    }
}
