use reqwest::StatusCode;

use crate::helpers::{TestApp, assert_problem};

#[tokio::test]
async fn operator_routes_need_the_token() {
    let app = TestApp::spawn().await;
    for path in ["/v1/dead-letters", "/v1/events/evt_1", "/v1/dead-letters/1"] {
        let url = format!("{}{path}", app.admin);

        let none = app.http.get(&url).send().await.unwrap();
        let wrong = app
            .http
            .get(&url)
            .bearer_auth("wrong-token")
            .send()
            .await
            .unwrap();

        assert_problem(none, StatusCode::UNAUTHORIZED, "unauthorized").await;
        assert_problem(wrong, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    let replay = app
        .http
        .post(format!("{}/v1/dead-letters/1/replay", app.admin))
        .send()
        .await
        .unwrap();
    assert_problem(replay, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

#[tokio::test]
async fn probes_need_no_token() {
    let app = TestApp::spawn().await;

    let live = app
        .http
        .get(format!("{}/livez", app.admin))
        .send()
        .await
        .unwrap();
    let ready = app
        .http
        .get(format!("{}/readyz", app.admin))
        .send()
        .await
        .unwrap();

    assert_eq!(live.status(), StatusCode::OK);
    assert_eq!(ready.status(), StatusCode::OK);
}

#[tokio::test]
async fn an_unknown_event_is_404() {
    let app = TestApp::spawn().await;

    let response = app.admin_get("/v1/events/evt_nope").await;

    assert_problem(response, StatusCode::NOT_FOUND, "not-found").await;
}

#[tokio::test]
async fn the_admin_routes_are_not_on_the_public_listener() {
    let app = TestApp::spawn().await;

    let response = app
        .http
        .get(format!("{}/v1/dead-letters", app.public))
        .bearer_auth(crate::helpers::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();

    assert_problem(response, StatusCode::NOT_FOUND, "not-found").await;
}
