//! The template store under containerd: what an operator or a crowd of
//! first pods does to it. A template removed while pods cloned from it run
//! (`jevm template remove`, or an upgrade clearing the store) must leave
//! them running, and the next create rebuilds it; the first pods of a
//! fresh node, created at the same moment, build one template between
//! them and all clone it. These tests empty `hack/containerd-env`'s
//! template store, so `hack/e2e` runs this binary alone.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use jevm_runtime::template::TemplateStore;
use jevm_tests::ctr::{id, Env, Running, JEVM};
use jevm_tests::ctr_env_or_skip;

fn store() -> TemplateStore {
    let dir = std::env::var("JEVM_TEMPLATE_DIR")
        .expect("JEVM_TEMPLATE_DIR (hack/containerd-env) is not set");
    TemplateStore::new(PathBuf::from(dir))
}

/// The keys of the valid templates in the store.
fn valid_templates(store: &TemplateStore) -> Vec<String> {
    store
        .list()
        .unwrap()
        .into_iter()
        .filter(|t| t.status.is_valid())
        .map(|t| t.key)
        .collect()
}

/// Everything in the store's directory but its digest cache (`.digests`):
/// templates, their lock files, and whatever a build or a removal left
/// behind (`.staging-*`, `.trash-*` directories).
fn store_entries(store: &TemplateStore) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".digests")
        .collect();
    v.sort();
    v
}

/// The template memory file `pid` has mapped: its path, inode, and whether
/// the mapping says the file was deleted.
fn mapped_template(pid: u32, store: &TemplateStore) -> Option<(PathBuf, u64, bool)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let root = store.root().to_string_lossy().into_owned();
    maps.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let path = f.get(5)?;
        if !path.starts_with(&root) || !path.ends_with("/memory") {
            return None;
        }
        Some((
            PathBuf::from(path),
            f[4].parse().ok()?,
            f.get(6) == Some(&"(deleted)"),
        ))
    })
}

fn the_shim(env: &Env, cid: &str) -> u32 {
    let shims = env.shims(Some(cid));
    assert_eq!(shims.len(), 1, "{cid}: shims {shims:?}");
    shims[0]
}

fn exec_echo(env: &Env, cid: &str, exec_id: &str, word: &str) {
    let o = env.ctr_out(&["task", "exec", "--exec-id", exec_id, cid, "echo", word]);
    assert_eq!((o.code, o.stdout.trim()), (0, word), "{cid}: exec: {o:?}");
}

/// Stops and removes the containers it names when it goes out of scope,
/// so that a failed assertion does not leave them to the next tests.
struct Cleanup<'a>(&'a Env, Vec<String>);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for cid in &self.1 {
            self.0.cleanup(cid);
        }
    }
}

fn remove_all(store: &TemplateStore) {
    for t in store.list().unwrap() {
        store.remove(&t.key).unwrap();
    }
}

#[test]
fn a_removed_template_leaves_its_pods_running_and_the_next_create_rebuilds_it() {
    let env = ctr_env_or_skip!();
    let store = store();
    let a = id("tpl-kept", JEVM);
    let b = id("tpl-next", JEVM);
    let _cleanup = Cleanup(&env, vec![a.clone(), b.clone()]);
    env.run_detached(JEVM, &a, &[], &["sleep", "600"]);
    let shim = the_shim(&env, &a);
    let (memory, ino, deleted) = mapped_template(shim, &store)
        .unwrap_or_else(|| panic!("{a}: its shim maps no template memory"));
    assert!(!deleted);
    assert_eq!(std::fs::metadata(&memory).unwrap().ino(), ino);
    let key = memory.parent().unwrap().file_name().unwrap();
    let key = key.to_string_lossy().into_owned();
    assert!(valid_templates(&store).contains(&key));

    store.remove(&key).unwrap();
    assert!(!memory.exists());
    // The pod runs on from the deleted file's pages (the store moved the
    // directory aside before removing it: the path says where it was).
    let after = mapped_template(shim, &store).map(|(_, ino, deleted)| (ino, deleted));
    assert_eq!(after, Some((ino, true)));
    exec_echo(&env, &a, "after-remove", "alive");

    let o = env.run(JEVM, &b, &[], &["echo", "rebuilt"]);
    assert_eq!((o.code, o.stdout.trim()), (0, "rebuilt"), "{b}: {o:?}");
    assert!(
        valid_templates(&store).contains(&key),
        "the template was not made again"
    );
    let new_ino = std::fs::metadata(&memory).unwrap().ino();
    assert_ne!(new_ino, ino, "the template was not rebuilt");
    exec_echo(&env, &a, "after-rebuild", "still");

    env.cleanup(&a);
    env.assert_gone(&a);
    env.assert_gone(&b);
}

#[test]
fn first_pods_created_together_build_one_template_and_all_clone_it() {
    let env = ctr_env_or_skip!();
    let store = store();
    remove_all(&store);
    assert!(valid_templates(&store).is_empty());
    let ids: Vec<String> = (0..3).map(|i| id(&format!("tpl-race{i}"), JEVM)).collect();
    let _cleanup = Cleanup(&env, ids.clone());
    let runs: Vec<Running> = ids
        .iter()
        .map(|cid| {
            let mut c = env.ctr();
            c.args([
                "run",
                "-d",
                "--runtime",
                JEVM,
                &env.image,
                cid,
                "sleep",
                "600",
            ]);
            Running::spawn(c, false)
        })
        .collect();
    for (cid, run) in ids.iter().zip(runs) {
        let o = run.wait(Duration::from_secs(300));
        assert_eq!(o.code, 0, "{cid}: ctr run -d: {o:?}");
        env.wait_status(cid, "RUNNING", Duration::from_secs(120));
    }
    let keys = valid_templates(&store);
    assert_eq!(keys.len(), 1, "templates: {keys:?}");
    let key = &keys[0];
    assert_eq!(
        store_entries(&store),
        vec![key.clone(), format!("{key}.lock")],
        "a build left something behind"
    );
    let ino = std::fs::metadata(store.root().join(key).join("memory"))
        .unwrap()
        .ino();
    for cid in &ids {
        let shim = the_shim(&env, cid);
        let mapped = mapped_template(shim, &store).map(|(_, ino, deleted)| (ino, deleted));
        assert_eq!(
            mapped,
            Some((ino, false)),
            "{cid} runs on another template's memory"
        );
        exec_echo(&env, cid, "up", "cloned");
    }
    for cid in &ids {
        env.cleanup(cid);
        env.assert_gone(cid);
    }
}
