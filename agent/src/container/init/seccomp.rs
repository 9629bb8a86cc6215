//! The spec's seccomp profile compiled to BPF with `seccompiler`.
//!
//! A seccompiler filter has one action for matching calls and one for the
//! rest, while an OCI profile has a default action and rules with actions
//! of their own. The profile becomes a stack of filters, which the kernel
//! evaluates all, keeping the most restrictive result:
//! - one filter allowing every call some rule gives a non-default action
//!   (with that rule's argument conditions) and returning the default action
//!   for everything else (left out when the default is to allow);
//! - for each other non-allowing action, one filter returning it for the
//!   calls of its rules and allowing everything else.
//!
//! A call matched by a rule thus gets its rule's action (the most
//! restrictive one if several rules match), any other call the default.

use super::errors::errno_desc;
use super::syscalls;
use anyhow::{anyhow, bail, Result};
use nix::errno::Errno;
use oci_spec::runtime::{
    LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag, LinuxSeccompOperator,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

pub struct Filters {
    programs: Vec<BpfProgram>,
    flags: libc::c_ulong,
}

/// Rules of one filter: per syscall number, None when the call matches
/// whatever its arguments.
type RuleMap = BTreeMap<i64, Option<Vec<SeccompRule>>>;

fn action_of(action: LinuxSeccompAction, errno: Option<u32>) -> Result<SeccompAction> {
    use LinuxSeccompAction as A;
    let errno = errno.unwrap_or(libc::EPERM as u32);
    Ok(match action {
        A::ScmpActKill | A::ScmpActKillThread => SeccompAction::KillThread,
        A::ScmpActKillProcess => SeccompAction::KillProcess,
        A::ScmpActTrap => SeccompAction::Trap,
        A::ScmpActErrno => SeccompAction::Errno(errno),
        A::ScmpActTrace => SeccompAction::Trace(errno),
        A::ScmpActLog => SeccompAction::Log,
        A::ScmpActAllow => SeccompAction::Allow,
        A::ScmpActNotify => bail!("seccomp: action SCMP_ACT_NOTIFY is not supported by jevm"),
    })
}

fn condition_of(arg: &LinuxSeccompArg) -> Result<SeccompCondition> {
    use LinuxSeccompOperator as O;
    let (op, value) = match arg.op() {
        O::ScmpCmpNe => (SeccompCmpOp::Ne, arg.value()),
        O::ScmpCmpLt => (SeccompCmpOp::Lt, arg.value()),
        O::ScmpCmpLe => (SeccompCmpOp::Le, arg.value()),
        O::ScmpCmpEq => (SeccompCmpOp::Eq, arg.value()),
        O::ScmpCmpGe => (SeccompCmpOp::Ge, arg.value()),
        O::ScmpCmpGt => (SeccompCmpOp::Gt, arg.value()),
        // libseccomp: (arg & value) == valueTwo.
        O::ScmpCmpMaskedEq => (
            SeccompCmpOp::MaskedEq(arg.value()),
            arg.value_two().unwrap_or(0),
        ),
    };
    let index = u8::try_from(arg.index())
        .map_err(|_| anyhow!("seccomp: argument index {} out of range", arg.index()))?;
    SeccompCondition::new(index, SeccompCmpArgLen::Qword, op, value)
        .map_err(|e| anyhow!("seccomp: argument index {}: {e}", arg.index()))
}

fn add(map: &mut RuleMap, nr: i64, rule: Option<SeccompRule>) {
    let entry = map.entry(nr).or_insert_with(|| Some(Vec::new()));
    match (entry.as_mut(), rule) {
        // Already unconditional.
        (None, _) => {}
        (Some(_), None) => *entry = None,
        (Some(rules), Some(rule)) => rules.push(rule),
    }
}

fn finish(map: RuleMap) -> BTreeMap<i64, Vec<SeccompRule>> {
    map.into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect()
}

/// The filters for `profile`, or None when there is nothing to enforce.
pub fn compile(profile: Option<&LinuxSeccomp>) -> Result<Option<Filters>> {
    let Some(profile) = profile else {
        return Ok(None);
    };
    if !cfg!(target_arch = "x86_64") {
        bail!("seccomp: only x86_64 profiles are supported");
    }
    let default = action_of(profile.default_action(), profile.default_errno_ret())?;
    let mut flags: libc::c_ulong = 0;
    for f in profile.flags().as_deref().unwrap_or_default() {
        flags |= match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync => libc::SECCOMP_FILTER_FLAG_TSYNC,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            // Only matters to a notify listener, which jevm has not.
            LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => 0,
        };
    }

    // Calls whose action differs from the default, allowed by the default filter.
    let mut excepted = RuleMap::new();
    let mut by_action: Vec<(SeccompAction, RuleMap)> = Vec::new();
    for sc in profile.syscalls().as_deref().unwrap_or_default() {
        let action = action_of(sc.action(), sc.errno_ret())?;
        if action == default {
            continue;
        }
        let rule = match sc.args().as_deref() {
            None | Some([]) => None,
            Some(args) => Some(
                SeccompRule::new(args.iter().map(condition_of).collect::<Result<_>>()?)
                    .map_err(|e| anyhow!("seccomp: {e}"))?,
            ),
        };
        for name in sc.names() {
            // Like libseccomp under runc: a name this architecture lacks is
            // skipped (profiles list calls of every architecture).
            let Some(nr) = syscalls::number(name) else {
                continue;
            };
            add(&mut excepted, nr, rule.clone());
            if action != SeccompAction::Allow {
                match by_action.iter_mut().find(|(a, _)| *a == action) {
                    Some((_, map)) => add(map, nr, rule.clone()),
                    None => {
                        let mut map = RuleMap::new();
                        add(&mut map, nr, rule.clone());
                        by_action.push((action.clone(), map));
                    }
                }
            }
        }
    }

    let arch = TargetArch::x86_64;
    let mut filters = Vec::new();
    if default != SeccompAction::Allow {
        filters.push(
            SeccompFilter::new(
                finish(excepted),
                default.clone(),
                SeccompAction::Allow,
                arch,
            )
            .map_err(|e| anyhow!("seccomp: {e}"))?,
        );
    }
    for (action, map) in by_action {
        filters.push(
            SeccompFilter::new(finish(map), SeccompAction::Allow, action, arch)
                .map_err(|e| anyhow!("seccomp: {e}"))?,
        );
    }
    let programs = filters
        .into_iter()
        .map(|f| BpfProgram::try_from(f).map_err(|e| anyhow!("seccomp: {e}")))
        .collect::<Result<Vec<_>>>()?;
    Ok((!programs.is_empty()).then_some(Filters { programs, flags }))
}

impl Filters {
    /// Installs the filters on this thread (they survive `execve`).
    pub fn load(&self) -> Result<()> {
        for program in &self.programs {
            let len = u16::try_from(program.len()).map_err(|_| {
                anyhow!(
                    "seccomp: filter of {} instructions is too long",
                    program.len()
                )
            })?;
            let prog = libc::sock_fprog {
                len,
                // seccompiler's sock_filter is the kernel's struct sock_filter.
                filter: program.as_ptr() as *mut libc::sock_filter,
            };
            // SAFETY: `prog` points at `program`, alive for the call; the
            // kernel copies the filter and does not keep the pointer.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    self.flags,
                    &prog as *const libc::sock_fprog,
                )
            };
            if rc != 0 {
                bail!("load seccomp filter: {}", errno_desc(Errno::last()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn allow_default_with_one_errno_rule_is_one_filter() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["mkdir","mkdirat","no_such_call"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#,
        );
        let f = compile(Some(&p)).unwrap().unwrap();
        assert_eq!(f.programs.len(), 1);
    }

    #[test]
    fn deny_default_gets_an_allow_list_filter() {
        let p = profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[
                {"names":["read","write"],"action":"SCMP_ACT_ALLOW"},
                {"names":["clone3"],"action":"SCMP_ACT_ERRNO","errnoRet":38},
                {"names":["personality"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":0,"op":"SCMP_CMP_EQ"}]}]}"#,
        );
        let f = compile(Some(&p)).unwrap().unwrap();
        assert_eq!(f.programs.len(), 2);
    }

    #[test]
    fn notify_is_refused_by_name() {
        let p = profile(r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#);
        let err = compile(Some(&p)).err().unwrap().to_string();
        assert!(err.contains("SCMP_ACT_NOTIFY"), "{err}");
    }

    #[test]
    fn syscall_table_is_sorted_and_known() {
        assert!(syscalls::X86_64.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(syscalls::number("mkdir"), Some(83));
        assert_eq!(syscalls::number("mseal"), Some(462));
        assert_eq!(syscalls::number("nope"), None);
    }
}
