//! Denials carry structured data: which block is to blame.

use std::time::SystemTime;

use till_core::{
    DenialKind, Policies, RequestFacts, Scope, Stage, Verifier, attenuate, decide, issue, keys,
};

fn facts(path: &str) -> RequestFacts {
    RequestFacts {
        service: "items".into(),
        method: "GET".into(),
        path: path.into(),
        model: None,
        mcp: None,
        time: SystemTime::now(),
    }
}

#[test]
fn a_denial_names_the_block_and_check_that_failed_or_the_block_revoked() {
    let root = keys::generate();
    let v = Verifier::new(root.public(), Policies::default_policy());
    let parent = issue(
        &root,
        &Scope {
            services: vec!["items".into()],
            ..Scope::default()
        },
    )
    .unwrap();
    let child = attenuate(
        &parent,
        &Scope {
            paths: vec!["/v1/items".into()],
            max_uses: Some(2),
            ..Scope::default()
        },
    )
    .unwrap();
    let t = v.verify_token(&child).unwrap();

    // The child's path check (block 1).
    let d = decide(&v, &t, None, &facts("/v1/admin"), &[0, 0], Stage::Final).unwrap_err();
    assert_eq!((d.kind, d.block), (DenialKind::Scope, Some(1)), "{d:?}");
    let checks = &t.view.blocks[1].checks;
    assert!(
        matches!(
            checks[d.check.unwrap()],
            till_core::CheckMeaning::PathPrefixes { .. }
        ),
        "{d:?} {checks:?}"
    );
    // The child's use limit (block 1), used up.
    let d = decide(&v, &t, None, &facts("/v1/items"), &[2, 2], Stage::Final).unwrap_err();
    assert_eq!((d.kind, d.block), (DenialKind::Exhausted, Some(1)), "{d:?}");
    assert!(matches!(
        checks[d.check.unwrap()],
        till_core::CheckMeaning::UseLimit { block: 1, limit: 2 }
    ));
    // The parent revoked (block 0).
    let d = decide(&v, &t, Some(0), &facts("/v1/items"), &[0, 0], Stage::Final).unwrap_err();
    assert_eq!(
        (d.kind, d.block, d.check),
        (DenialKind::Revoked, Some(0), None),
        "{d:?}"
    );
    // No right covers another service: no block to blame.
    let mut f = facts("/v1/items");
    f.service = "billing".into();
    let d = decide(&v, &t, None, &f, &[0, 0], Stage::Final).unwrap_err();
    assert_eq!(d.kind, DenialKind::Scope, "{d:?}");
    assert!(decide(&v, &t, None, &facts("/v1/items"), &[1, 1], Stage::Final).is_ok());
}
